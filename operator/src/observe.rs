//! Observe: a job's runner pods, read from the controller's watch cache, as
//! [`PodView`]s — which step and attempt each pod runs (its labels, read by
//! [`StepAttempt::from_labels`]), its phase, timing, the runner's report from
//! its termination message, and why it failed or waits.

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use kubewan_crds::report::{RunReport, shorten};
use kubewan_crds::{StepAttempt, StepId, TravelJob};

use crate::pods::CONTAINER;

/// What the operator needs to know about one runner pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    pub step: StepId,
    pub attempt: u32,
    pub phase: PodPhase,
    /// When the pod's deletion grace period ends (its deletionTimestamp): the
    /// pod is being deleted (suspend, job failure, eviction, or by someone else).
    pub deletion: Option<Timestamp>,
    pub started: Option<Timestamp>,
    pub finished: Option<Timestamp>,
    /// The runner's report, when the termination message holds one.
    pub report: Option<RunReport>,
    /// Why the pod failed, in one line (exit code, runner message, kubelet reason).
    pub failure: Option<String>,
    /// Why a pending pod is not running yet (unschedulable, image pull, ...).
    pub waiting: Option<String>,
    /// The kubelet cannot start the pod's container (its image cannot be
    /// pulled, its configuration is missing): waiting longer may not help.
    pub cannot_start: bool,
    /// Another attempt cannot help: the pod ran past its deadline, or its
    /// image name is invalid.
    pub permanent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl PodPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

impl PodView {
    /// Still running or about to: neither finished nor being deleted.
    pub fn is_active(&self) -> bool {
        !self.is_terminating() && !self.phase.is_finished()
    }

    pub fn is_terminating(&self) -> bool {
        self.deletion.is_some()
    }
}

/// The runner pods of `job` in the watch cache: those it controls (by uid, so a
/// new job of the same name never adopts an old one's pods) and that carry a
/// step's labels.
pub fn job_pods(job: &TravelJob, cache: &Store<Pod>) -> Vec<PodView> {
    let Some(uid) = job.uid() else {
        return Vec::new();
    };
    let controlled = |pod: &Pod| {
        pod.owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true))
    };
    cache
        .state()
        .iter()
        .filter(|pod| pod.namespace() == job.namespace() && controlled(pod))
        .filter_map(|pod| PodView::from_pod(pod))
        .collect()
}

fn one_line(text: &str, max: usize) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    shorten(&joined, max)
}

/// `reason: message` in one line, or just the reason.
fn reason_and_message(reason: String, message: Option<&str>) -> String {
    match message {
        Some(m) => format!("{reason}: {}", one_line(m, 300)),
        None => reason,
    }
}

impl PodView {
    /// Reads a runner pod; None for pods without a step's labels.
    pub fn from_pod(pod: &Pod) -> Option<PodView> {
        let StepAttempt { step, attempt } = StepAttempt::from_labels(pod.labels())?;
        let status = pod.status.clone().unwrap_or_default();
        let phase = match status.phase.as_deref() {
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Pending,
        };
        let terminated = status
            .container_statuses
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER).or(cs.first()))
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref());
        let message = terminated
            .and_then(|t| t.message.clone())
            .unwrap_or_default();
        let report = RunReport::from_termination_message(&message);
        let failure = (phase == PodPhase::Failed).then(|| {
            let exit_code = terminated.map(|t| t.exit_code);
            let kubelet_reason = terminated.and_then(|t| t.reason.clone());
            failure_reason(
                exit_code,
                report.as_ref(),
                &message,
                kubelet_reason,
                &status,
            )
        });
        let waiting = (phase == PodPhase::Pending)
            .then(|| waiting_reason(&status))
            .flatten();
        let start_failure = (phase == PodPhase::Pending)
            .then(|| container_start_failure(&status))
            .flatten();
        let permanent = match phase {
            PodPhase::Failed => status.reason.as_deref() == Some("DeadlineExceeded"),
            _ => start_failure.is_some_and(|(_, permanent)| permanent),
        };
        Some(PodView {
            name: pod.name_any(),
            step,
            attempt,
            phase,
            deletion: pod.metadata.deletion_timestamp.as_ref().map(|t| t.0),
            started: status
                .start_time
                .as_ref()
                .or(pod.metadata.creation_timestamp.as_ref())
                .map(|t| t.0),
            finished: terminated.and_then(|t| t.finished_at.as_ref()).map(|t| t.0),
            report,
            failure,
            waiting,
            cannot_start: start_failure.is_some(),
            permanent,
        })
    }
}

/// Why a pod failed, in one line: its exit code, the kubelet's reason when it
/// says more than the exit code (`OOMKilled`), the runner's own message (or
/// the last log lines, or the kubelet's generic reason), then the pod's reason.
fn failure_reason(
    exit_code: Option<i32>,
    report: Option<&RunReport>,
    termination_message: &str,
    kubelet_reason: Option<String>,
    status: &PodStatus,
) -> String {
    let mut parts = Vec::new();
    if let Some(code) = exit_code {
        parts.push(format!("exit code {code}"));
    }
    // "Error" and "Completed" only restate the exit code; anything else (the
    // kernel's OOM kill) is what the runner, killed, could not say itself.
    let generic = |r: &String| matches!(r.as_str(), "Error" | "Completed");
    if let Some(reason) = kubelet_reason.as_ref().filter(|r| !generic(r)) {
        parts.push(reason.clone());
    }
    if let Some(msg) = report.and_then(|r| r.message.as_deref()) {
        parts.push(one_line(msg, 600));
    } else if !termination_message.trim().is_empty() {
        // Logs (FallbackToLogsOnError): the last lines say most.
        let lines: Vec<&str> = termination_message.trim().lines().collect();
        let tail = &lines[lines.len().saturating_sub(3)..];
        parts.push(one_line(&tail.join(" "), 600));
    } else if let Some(reason) = kubelet_reason.filter(generic) {
        parts.push(reason);
    }
    if let Some(reason) = &status.reason {
        parts.push(reason_and_message(
            reason.clone(),
            status.message.as_deref(),
        ));
    }
    if parts.is_empty() {
        "pod failed without a reason".into()
    } else {
        parts.join(": ")
    }
}

/// The kubelet's reasons for not starting a container that will not pass by
/// themselves soon, each with whether retrying the pod can help at all.
const START_FAILURES: [(&str, bool); 6] = [
    ("ErrImagePull", false),
    ("ImagePullBackOff", false),
    ("CreateContainerConfigError", false),
    ("CreateContainerError", false),
    ("InvalidImageName", true),
    ("ErrImageNeverPull", true),
];

/// A container the kubelet cannot start: its waiting reason and whether that
/// is permanent (the pod's image name itself is wrong).
fn container_start_failure(status: &PodStatus) -> Option<(&str, bool)> {
    status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
        .find_map(|reason| START_FAILURES.iter().find(|(r, _)| *r == reason).copied())
}
/// Container waiting reasons of a pod that is simply starting: no news.
const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];

/// Why a pending pod waits: the scheduler's verdict, or its container's
/// waiting reason (e.g. ImagePullBackOff) unless it is merely starting.
fn waiting_reason(status: &PodStatus) -> Option<String> {
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = unscheduled {
        let reason = c.reason.clone().unwrap_or_else(|| "Unschedulable".into());
        return Some(reason_and_message(reason, c.message.as_deref()));
    }
    status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .filter(|w| !STARTING.contains(&w.reason.as_deref().unwrap_or_default()))
        .find_map(|w| Some(reason_and_message(w.reason.clone()?, w.message.as_deref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{job, pod, t, with_report};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition,
    };
    use kube::runtime::reflector::store;
    use kube::runtime::watcher::Event;

    #[test]
    fn reads_a_pod_and_its_report() {
        let report = RunReport {
            step: StepId::Segment(2),
            ok: true,
            peak_rss_bytes: 42,
            ..Default::default()
        };
        let v = PodView::from_pod(&with_report(
            pod(StepId::Segment(2), 3, "Succeeded"),
            &report.to_termination_message(),
            0,
        ))
        .unwrap();
        assert_eq!(
            (v.name.as_str(), v.step, v.attempt, v.phase),
            ("trip-seg-2-3", StepId::Segment(2), 3, PodPhase::Succeeded)
        );
        assert_eq!(v.report.unwrap().peak_rss_bytes, 42);
        assert_eq!(v.finished, Some(t(5)));
        assert_eq!(v.failure, None);
    }

    #[test]
    fn a_failed_pod_says_why() {
        let report = RunReport {
            step: StepId::Segment(2),
            ok: false,
            message: Some("keyframe /inputs/missing.png does not exist".into()),
            ..Default::default()
        };
        let failed = |message: &str, exit: i32| {
            PodView::from_pod(&with_report(
                pod(StepId::Segment(2), 3, "Failed"),
                message,
                exit,
            ))
            .unwrap()
        };
        assert_eq!(
            failed(&report.to_termination_message(), 1)
                .failure
                .as_deref(),
            Some("exit code 1: keyframe /inputs/missing.png does not exist")
        );
        // Logs instead of a report (FallbackToLogsOnError).
        assert_eq!(
            failed("loading\npanicked at boom\n", 101)
                .failure
                .as_deref(),
            Some("exit code 101: loading panicked at boom")
        );
        // Logs ending with a report line.
        let logs = format!("starting\n{}\n", report.to_termination_message());
        assert!(failed(&logs, 1).report.is_some());
        // Killed for its memory limit: the kubelet's reason comes first, the
        // message the runner left before it was killed after it.
        let mut oom = with_report(
            pod(StepId::Segment(2), 3, "Failed"),
            "the runner stopped before writing its report",
            137,
        );
        let statuses = oom.status.as_mut().unwrap().container_statuses.as_mut();
        let terminated = statuses.unwrap()[0].state.as_mut().unwrap();
        terminated.terminated.as_mut().unwrap().reason = Some("OOMKilled".into());
        assert_eq!(
            PodView::from_pod(&oom).unwrap().failure.as_deref(),
            Some("exit code 137: OOMKilled: the runner stopped before writing its report")
        );
    }

    #[test]
    fn a_pending_pod_says_why_it_waits() {
        let mut pending = pod(StepId::Segment(2), 3, "Pending");
        pending.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".into()),
            ..Default::default()
        }]);
        let v = PodView::from_pod(&pending).unwrap();
        assert_eq!(
            v.waiting.as_deref(),
            Some("Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
        );
    }

    #[test]
    fn what_retrying_cannot_help_is_told_apart() {
        let mut late = pod(StepId::Segment(2), 3, "Failed");
        let status = late.status.as_mut().unwrap();
        status.reason = Some("DeadlineExceeded".into());
        status.message =
            Some("Pod was active on the node longer than the specified deadline".into());
        let late = PodView::from_pod(&late).unwrap();
        assert!(late.permanent, "{late:?}");
        assert!(
            late.failure
                .unwrap()
                .starts_with("DeadlineExceeded: Pod was active")
        );

        let waiting = |reason: &str| {
            let mut p = pod(StepId::Segment(2), 3, "Pending");
            p.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
                name: CONTAINER.into(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        message: Some("details".into()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
            PodView::from_pod(&p).unwrap()
        };
        let pulling = waiting("ImagePullBackOff");
        assert!(pulling.cannot_start && !pulling.permanent);
        assert_eq!(
            pulling.waiting.as_deref(),
            Some("ImagePullBackOff: details")
        );
        let invalid = waiting("InvalidImageName");
        assert!(invalid.cannot_start && invalid.permanent);
        // A pod whose container is simply starting is no news.
        for starting in ["ContainerCreating", "PodInitializing"] {
            let v = waiting(starting);
            assert!(
                !v.cannot_start && !v.permanent && v.waiting.is_none(),
                "{v:?}"
            );
        }
    }

    #[test]
    fn pods_without_our_labels_are_ignored() {
        let mut foreign = pod(StepId::Segment(2), 3, "Running");
        foreign.metadata.labels = None;
        assert!(PodView::from_pod(&foreign).is_none());
    }

    #[test]
    fn a_job_sees_only_the_pods_it_controls() {
        let trip = job(
            "keyframes: [a, b]\ncheckpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n",
        );
        let mine = pod(StepId::Segment(0), 1, "Running");
        let mut old_namesake = pod(StepId::Segment(0), 2, "Running");
        old_namesake.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-0".into();
        let mut elsewhere = pod(StepId::Segment(0), 3, "Running");
        elsewhere.metadata.namespace = Some("other".into());
        let (reader, mut writer) = store();
        for p in [mine, old_namesake, elsewhere] {
            writer.apply_watcher_event(&Event::Apply(p));
        }
        let seen: Vec<String> = job_pods(&trip, &reader)
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(seen, ["trip-seg-0-1"]);
    }
}
