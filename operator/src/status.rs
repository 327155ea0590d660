//! Pure: the pods that exist, folded into the TravelJob's status.
//!
//! Level-triggered: every step's state is derived from its pods (phase, exit
//! code, termination message parsed as a [`RunReport`]), so an operator that
//! restarts reads the same state back and never starts a step twice.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubewan_crds::StepId;
use kubewan_crds::report::RunReport;
use kubewan_crds::status::{JobPhase, StepPhase, StepStatus, TravelJobStatus};

use crate::pods::{CONTAINER, LABEL_ATTEMPT, LABEL_SEGMENT, LABEL_STAGE};

/// What the operator needs to know about one runner pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    pub step: StepId,
    pub attempt: u32,
    pub phase: PodPhase,
    /// The pod is being deleted (suspend, job failure, or by someone else).
    pub terminating: bool,
    pub started: Option<Timestamp>,
    pub finished: Option<Timestamp>,
    /// The runner's report, when the termination message holds one.
    pub report: Option<RunReport>,
    /// Why the pod failed, in one line (exit code, runner message, kubelet reason).
    pub failure: Option<String>,
    /// Why a pending pod is not running yet (unschedulable, image pull, ...).
    pub waiting: Option<String>,
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

/// Parses a termination message as a runner report: the whole message, or (when
/// the kubelet fell back to the log tail) its last line that is a report.
pub fn parse_report(message: &str) -> Option<RunReport> {
    let message = message.trim();
    serde_json::from_str(message).ok().or_else(|| {
        message
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str(line.trim()).ok())
    })
}

fn one_line(text: &str, max: usize) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    kubewan_crds::report::shorten(&joined, max)
}

impl PodView {
    /// Reads a runner pod; None for pods without kubewan's stage labels.
    pub fn from_pod(pod: &Pod) -> Option<PodView> {
        let labels = pod.labels();
        let attempt: u32 = labels.get(LABEL_ATTEMPT)?.parse().ok()?;
        let step = match labels.get(LABEL_STAGE)?.as_str() {
            "prompts" => StepId::Prompts,
            "segment" => StepId::Segment(labels.get(LABEL_SEGMENT)?.parse().ok()?),
            "stitch" => StepId::Stitch,
            _ => return None,
        };
        let status = pod.status.clone().unwrap_or_default();
        let phase = match status.phase.as_deref() {
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Pending,
        };
        let container = status
            .container_statuses
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER).or(cs.first()));
        let terminated = container
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref());
        let raw = terminated
            .and_then(|t| t.message.clone())
            .unwrap_or_default();
        let report = parse_report(&raw);
        let failure = (phase == PodPhase::Failed).then(|| {
            let mut parts = Vec::new();
            if let Some(t) = terminated {
                parts.push(format!("exit code {}", t.exit_code));
            }
            if let Some(msg) = report.as_ref().and_then(|r| r.message.clone()) {
                parts.push(one_line(&msg, 600));
            } else if !raw.trim().is_empty() {
                // Logs (FallbackToLogsOnError): the last lines say most.
                let tail: Vec<&str> = raw.trim().lines().rev().take(3).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                parts.push(one_line(&tail.join(" "), 600));
            } else if let Some(reason) = terminated.and_then(|t| t.reason.clone()) {
                parts.push(reason);
            }
            if let Some(reason) = &status.reason {
                parts.push(match &status.message {
                    Some(m) => format!("{reason}: {}", one_line(m, 300)),
                    None => reason.clone(),
                });
            }
            if parts.is_empty() {
                "pod failed without a reason".into()
            } else {
                parts.join(": ")
            }
        });
        let waiting = (phase == PodPhase::Pending)
            .then(|| waiting_reason(&status))
            .flatten();
        Some(PodView {
            name: pod.name_any(),
            step,
            attempt,
            phase,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            started: status
                .start_time
                .map(|t| t.0)
                .or_else(|| pod.metadata.creation_timestamp.clone().map(|t| t.0)),
            finished: terminated.and_then(|t| t.finished_at.clone()).map(|t| t.0),
            report,
            failure,
            waiting,
        })
    }
}

/// Why a pending pod waits: the scheduler's verdict, or its container's
/// waiting reason (e.g. ImagePullBackOff).
fn waiting_reason(status: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = unscheduled {
        let reason = c.reason.clone().unwrap_or_else(|| "Unschedulable".into());
        return Some(match &c.message {
            Some(m) => format!("{reason}: {}", one_line(m, 300)),
            None => reason,
        });
    }
    status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find_map(|w| {
            let reason = w.reason.clone()?;
            Some(match &w.message {
                Some(m) => format!("{reason}: {}", one_line(m, 300)),
                None => reason,
            })
        })
}

/// Exponential retry delay: `base · 2^(failures-1)`, capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(360),
        }
    }
}

impl Backoff {
    /// Delay before the retry that follows the `failures`-th failure (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(20);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// One step's state, derived from its pods.
#[derive(Clone, Debug, PartialEq)]
pub struct StepState {
    pub step: StepId,
    pub phase: StepPhase,
    /// The latest attempt number seen (0 when no pod exists).
    pub attempts: u32,
    pub failures: u32,
    /// The attempt the next pod of this step will carry.
    pub next_attempt: u32,
    /// When a failed step may retry.
    pub retry_at: Option<Timestamp>,
    /// A pod of this step is still being deleted; nothing new may start until it is gone.
    pub terminating: bool,
    pub status: StepStatus,
}

/// Folds the pods of one step. `backoff_limit` retries are allowed after the first try.
pub fn fold_step(
    step: StepId,
    pods: &[&PodView],
    previous: Option<&StepStatus>,
    backoff_limit: u32,
    backoff: Backoff,
    now: Timestamp,
) -> StepState {
    let live: Vec<&&PodView> = pods.iter().filter(|p| !p.terminating).collect();
    let terminating = pods.iter().any(|p| p.terminating && !p.phase.is_finished());
    let failures = live.iter().filter(|p| p.phase == PodPhase::Failed).count() as u32;
    let max_attempt = pods.iter().map(|p| p.attempt).max().unwrap_or(0);
    let latest = live.iter().max_by_key(|p| p.attempt).copied().copied();
    let mut state = StepState {
        step,
        phase: StepPhase::Pending,
        attempts: max_attempt,
        failures,
        next_attempt: max_attempt + 1,
        retry_at: None,
        terminating,
        status: StepStatus::default(),
    };
    let Some(pod) = latest else {
        // A step recorded as succeeded stays succeeded even if its pods were
        // removed, so finished GPU work is never redone.
        if let Some(prev) = previous.filter(|p| p.phase == StepPhase::Succeeded) {
            state.phase = StepPhase::Succeeded;
            state.status = prev.clone();
            return state;
        }
        if terminating {
            state.phase = StepPhase::Running;
            state.status.phase = StepPhase::Running;
            state.status.message = Some("waiting for the previous pod to terminate".into());
        }
        state.status.attempts = max_attempt;
        return state;
    };
    state.status.pod = Some(pod.name.clone());
    state.status.attempts = pod.attempt;
    state.status.start_time = pod.started.map(Time);
    state.status.finish_time = pod.finished.map(Time);
    state.status.report = pod.report.clone().or_else(|| {
        // Keep the last known report of a running retry.
        live.iter()
            .filter(|p| p.phase.is_finished())
            .max_by_key(|p| p.attempt)
            .and_then(|p| p.report.clone())
    });
    state.phase = match pod.phase {
        PodPhase::Pending | PodPhase::Running => StepPhase::Running,
        PodPhase::Succeeded => StepPhase::Succeeded,
        PodPhase::Failed if failures > backoff_limit => StepPhase::Failed,
        PodPhase::Failed => StepPhase::Retrying,
    };
    let failure = pod.failure.clone().unwrap_or_default();
    match state.phase {
        StepPhase::Running => {
            state.status.message = Some(if pod.phase == PodPhase::Pending {
                match &pod.waiting {
                    Some(why) => format!("pod {} is pending: {why}", pod.name),
                    None => format!("pod {} is pending", pod.name),
                }
            } else {
                format!("pod {} is running", pod.name)
            });
        }
        StepPhase::Succeeded => {
            state.status.message = pod.report.as_ref().and_then(|r| r.message.clone());
        }
        StepPhase::Retrying => {
            let at = pod.finished.unwrap_or(now) + backoff.delay(failures);
            state.retry_at = Some(at);
            let wait = at.duration_since(now).as_secs().max(0);
            state.status.message = Some(format!(
                "attempt {} of {} failed (pod {}): {failure}; retrying in {wait}s",
                pod.attempt,
                backoff_limit + 1,
                pod.name
            ));
        }
        StepPhase::Failed => {
            state.status.message = Some(format!(
                "failed after {failures} attempt{} (pod {}): {failure}",
                if failures == 1 { "" } else { "s" },
                pod.name
            ));
        }
        StepPhase::Pending => {}
    }
    state.status.phase = state.phase;
    state
}

/// A human name for a step, as messages and events use it.
pub fn step_name(step: StepId) -> String {
    match step {
        StepId::Prompts => "prompts".into(),
        StepId::Segment(i) => format!("segment {i}"),
        StepId::Stitch => "stitch".into(),
    }
}

/// The job's phase while it runs, from its steps.
pub fn running_phase(steps: &[StepState]) -> JobPhase {
    let active = |s: &&StepState| matches!(s.phase, StepPhase::Running | StepPhase::Retrying);
    let started = |s: &&StepState| s.phase != StepPhase::Pending;
    if steps
        .iter()
        .filter(active)
        .any(|s| s.step == StepId::Stitch)
    {
        return JobPhase::Stitching;
    }
    let segments = || {
        steps
            .iter()
            .filter(|s| matches!(s.step, StepId::Segment(_)))
    };
    if segments().filter(started).count() > 0 {
        return JobPhase::Generating;
    }
    match steps.iter().find(|s| s.step == StepId::Prompts) {
        Some(p) if matches!(p.phase, StepPhase::Running | StepPhase::Retrying) => {
            JobPhase::Prompting
        }
        Some(p) if p.phase == StepPhase::Succeeded => JobPhase::Generating,
        _ => JobPhase::Pending,
    }
}

pub const COND_RUNNING: &str = "Running";
pub const COND_SUSPENDED: &str = "Suspended";
pub const COND_SUCCEEDED: &str = "Succeeded";
pub const COND_FAILED: &str = "Failed";
/// The reason of the Failed condition of a job whose spec did not validate.
pub const REASON_INVALID: &str = "InvalidSpec";

/// Sets a condition, keeping its transition time when its status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if on { "True" } else { "False" };
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// Sets the four standard conditions from the job's phase.
pub fn set_conditions(
    status: &mut TravelJobStatus,
    reason: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let phase = status.phase;
    let message = status.message.clone().unwrap_or_default();
    let running = matches!(
        phase,
        JobPhase::Pending | JobPhase::Prompting | JobPhase::Generating | JobPhase::Stitching
    );
    let mut conditions = std::mem::take(&mut status.conditions);
    let phase_reason = format!("{phase:?}");
    let (suspended, succeeded, failed) = (
        phase == JobPhase::Suspended,
        phase == JobPhase::Succeeded,
        phase == JobPhase::Failed,
    );
    // (type, true?, reason, message): the message goes with the condition that holds.
    let rows: [(&str, bool, &str, &str); 4] = [
        (
            COND_RUNNING,
            running && phase != JobPhase::Pending,
            &phase_reason,
            if running { &message } else { "" },
        ),
        (
            COND_SUSPENDED,
            suspended,
            if suspended {
                "JobSuspended"
            } else {
                "JobNotSuspended"
            },
            if suspended { &message } else { "" },
        ),
        (
            COND_SUCCEEDED,
            succeeded,
            if succeeded {
                "Completed"
            } else {
                &phase_reason
            },
            if succeeded { &message } else { "" },
        ),
        (
            COND_FAILED,
            failed,
            if failed { reason } else { "NotFailed" },
            if failed { &message } else { "" },
        ),
    ];
    for (type_, holds, reason, message) in rows {
        set_condition(
            &mut conditions,
            type_,
            holds,
            reason,
            message,
            generation,
            now,
        );
    }
    status.conditions = conditions;
}

/// The reason of the job's Failed condition, when it failed.
pub fn failed_reason(status: &TravelJobStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == COND_FAILED && c.status == "True")
        .map(|c| c.reason.as_str())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };
    use kube::api::ObjectMeta;
    use kubewan_crds::Stage;

    pub(crate) fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    pub(crate) fn view(step: StepId, attempt: u32, phase: PodPhase) -> PodView {
        PodView {
            name: crate::pods::pod_name("trip", step, attempt),
            step,
            attempt,
            phase,
            terminating: false,
            started: Some(t(0)),
            finished: phase.is_finished().then(|| t(10)),
            report: (phase == PodPhase::Succeeded).then(|| RunReport {
                stage: crate::pods::stage_of(step),
                ok: true,
                peak_rss_bytes: 100 << 20,
                output: Some(format!("{}.mp4", step_name(step).replace(' ', "-"))),
                ..Default::default()
            }),
            failure: (phase == PodPhase::Failed).then(|| "exit code 1: keyframe missing".into()),
            waiting: None,
        }
    }

    fn pod_with(phase: &str, message: Option<&str>, exit: i32) -> Pod {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(LABEL_STAGE.to_string(), "segment".to_string());
        labels.insert(LABEL_SEGMENT.to_string(), "2".to_string());
        labels.insert(LABEL_ATTEMPT.to_string(), "3".to_string());
        Pod {
            metadata: ObjectMeta {
                name: Some("trip-seg-2-3".into()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: CONTAINER.into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: exit,
                            message: message.map(Into::into),
                            finished_at: Some(Time(t(5))),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn reads_a_pod_and_its_report() {
        let report = RunReport {
            stage: Stage::Segment,
            segment: Some(2),
            ok: true,
            peak_rss_bytes: 42,
            ..Default::default()
        };
        let pod = pod_with("Succeeded", Some(&report.to_termination_message()), 0);
        let v = PodView::from_pod(&pod).unwrap();
        assert_eq!(
            (v.step, v.attempt, v.phase),
            (StepId::Segment(2), 3, PodPhase::Succeeded)
        );
        assert_eq!(v.report.unwrap().peak_rss_bytes, 42);
        assert_eq!(v.finished, Some(t(5)));
        assert_eq!(v.failure, None);
    }

    #[test]
    fn a_failed_pod_says_why() {
        let report = RunReport {
            stage: Stage::Segment,
            ok: false,
            message: Some("keyframe /inputs/missing.png does not exist".into()),
            ..Default::default()
        };
        let v = PodView::from_pod(&pod_with(
            "Failed",
            Some(&report.to_termination_message()),
            1,
        ))
        .unwrap();
        assert_eq!(
            v.failure.as_deref(),
            Some("exit code 1: keyframe /inputs/missing.png does not exist")
        );
        // Logs instead of a report (FallbackToLogsOnError).
        let v = PodView::from_pod(&pod_with(
            "Failed",
            Some("loading\npanicked at boom\n"),
            101,
        ))
        .unwrap();
        assert_eq!(
            v.failure.as_deref(),
            Some("exit code 101: loading panicked at boom")
        );
        // Logs ending with a report line.
        let logs = format!("starting\n{}\n", report.to_termination_message());
        assert!(
            PodView::from_pod(&pod_with("Failed", Some(&logs), 1))
                .unwrap()
                .report
                .is_some()
        );
    }

    #[test]
    fn a_pending_pod_says_why_it_waits() {
        use k8s_openapi::api::core::v1::PodCondition;
        let mut pod = pod_with("Pending", None, 0);
        let status = pod.status.as_mut().unwrap();
        status.container_statuses = None;
        status.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".into()),
            ..Default::default()
        }]);
        let v = PodView::from_pod(&pod).unwrap();
        assert_eq!(
            v.waiting.as_deref(),
            Some("Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
        );
        let s = fold_step(StepId::Segment(2), &[&v], None, 2, Backoff::default(), t(0));
        assert_eq!(s.phase, StepPhase::Running);
        assert!(
            s.status
                .message
                .unwrap()
                .contains("is pending: Unschedulable")
        );
    }

    #[test]
    fn pods_without_our_labels_are_ignored() {
        let mut pod = pod_with("Running", None, 0);
        pod.metadata.labels = None;
        assert!(PodView::from_pod(&pod).is_none());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_secs(10));
        assert_eq!(b.delay(2), Duration::from_secs(20));
        assert_eq!(b.delay(3), Duration::from_secs(40));
        assert_eq!(b.delay(10), Duration::from_secs(360));
        assert_eq!(b.delay(200), Duration::from_secs(360));
    }

    fn fold(pods: &[PodView], limit: u32, now: i64) -> StepState {
        let refs: Vec<&PodView> = pods.iter().collect();
        fold_step(
            StepId::Segment(1),
            &refs,
            None,
            limit,
            Backoff::default(),
            t(now),
        )
    }

    #[test]
    fn a_step_without_pods_is_pending() {
        let s = fold(&[], 2, 0);
        assert_eq!(
            (s.phase, s.next_attempt, s.attempts),
            (StepPhase::Pending, 1, 0)
        );
    }

    #[test]
    fn a_failed_pod_is_retried_after_backoff_until_the_limit() {
        let p1 = view(StepId::Segment(1), 1, PodPhase::Failed);
        let s = fold(std::slice::from_ref(&p1), 2, 12);
        assert_eq!(s.phase, StepPhase::Retrying);
        assert_eq!(s.next_attempt, 2);
        assert_eq!(s.retry_at, Some(t(20)), "finished at 10 + 10 s");
        assert!(
            s.status
                .message
                .as_ref()
                .unwrap()
                .contains("retrying in 8s"),
            "{:?}",
            s.status.message
        );

        let p2 = view(StepId::Segment(1), 2, PodPhase::Failed);
        let s = fold(&[p1.clone(), p2.clone()], 2, 12);
        assert_eq!((s.phase, s.retry_at), (StepPhase::Retrying, Some(t(30))));

        let p3 = view(StepId::Segment(1), 3, PodPhase::Failed);
        let s = fold(&[p1, p2, p3], 2, 12);
        assert_eq!(s.phase, StepPhase::Failed);
        let msg = s.status.message.unwrap();
        assert!(
            msg.contains(
                "failed after 3 attempts (pod trip-seg-1-3): exit code 1: keyframe missing"
            ),
            "{msg}"
        );
    }

    #[test]
    fn backoff_limit_zero_fails_at_once() {
        let s = fold(&[view(StepId::Segment(1), 1, PodPhase::Failed)], 0, 12);
        assert_eq!(s.phase, StepPhase::Failed);
    }

    #[test]
    fn a_retry_in_flight_is_running_and_keeps_the_last_report() {
        let mut p1 = view(StepId::Segment(1), 1, PodPhase::Failed);
        p1.report = Some(RunReport {
            peak_rss_bytes: 7,
            ..Default::default()
        });
        let p2 = view(StepId::Segment(1), 2, PodPhase::Running);
        let s = fold(&[p1, p2], 2, 12);
        assert_eq!((s.phase, s.status.attempts), (StepPhase::Running, 2));
        assert_eq!(s.status.pod.as_deref(), Some("trip-seg-1-2"));
        assert_eq!(s.status.report.unwrap().peak_rss_bytes, 7);
    }

    #[test]
    fn terminating_pods_block_but_do_not_count_as_failures() {
        let mut p1 = view(StepId::Segment(1), 1, PodPhase::Running);
        p1.terminating = true;
        let s = fold(&[p1.clone()], 2, 12);
        assert_eq!((s.phase, s.failures), (StepPhase::Running, 0));
        assert!(s.terminating);
        p1.phase = PodPhase::Failed;
        let s = fold(&[p1], 2, 12);
        assert_eq!(
            (s.phase, s.failures, s.next_attempt),
            (StepPhase::Pending, 0, 2)
        );
    }

    #[test]
    fn a_recorded_success_survives_its_pod() {
        let prev = StepStatus {
            phase: StepPhase::Succeeded,
            attempts: 1,
            ..Default::default()
        };
        let s = fold_step(
            StepId::Segment(0),
            &[],
            Some(&prev),
            2,
            Backoff::default(),
            t(0),
        );
        assert_eq!(s.phase, StepPhase::Succeeded);
    }

    #[test]
    fn conditions_keep_their_transition_time() {
        let mut status = TravelJobStatus {
            phase: JobPhase::Generating,
            ..Default::default()
        };
        set_conditions(&mut status, "", Some(1), t(0));
        set_conditions(&mut status, "", Some(2), t(50));
        let running = status
            .conditions
            .iter()
            .find(|c| c.type_ == COND_RUNNING)
            .unwrap();
        assert_eq!(
            (running.status.as_str(), running.last_transition_time.0),
            ("True", t(0))
        );
        assert_eq!(running.observed_generation, Some(2));
        status.phase = JobPhase::Failed;
        status.message = Some("boom".into());
        set_conditions(&mut status, "StepFailed", Some(2), t(60));
        let failed = status
            .conditions
            .iter()
            .find(|c| c.type_ == COND_FAILED)
            .unwrap();
        assert_eq!(
            (
                failed.status.as_str(),
                failed.reason.as_str(),
                failed.message.as_str()
            ),
            ("True", "StepFailed", "boom")
        );
        assert_eq!(failed_reason(&status), Some("StepFailed"));
        let running = status
            .conditions
            .iter()
            .find(|c| c.type_ == COND_RUNNING)
            .unwrap();
        assert_eq!(
            (running.status.as_str(), running.last_transition_time.0),
            ("False", t(60))
        );
    }
}
