//! Decide, purely: from the job, its plan (built once per reconcile), the pods
//! observed and the clock, everything one reconcile does — the status to write,
//! the pods to create and delete, the events, and when to look again. What the
//! API server answers to a pod creation it refused is folded back in here too
//! ([`pod_not_created`], [`pod_refused`]), so [`crate::apply`] only carries decisions out.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kubewan_crds::conditions::policy_failure_reason;
use kubewan_crds::status::{JobPhase, StepPhase, StepStatus, TravelJobStatus};
use kubewan_crds::{Plan, StepAttempt, StepId, Task, TravelJob};

use crate::conditions::{
    REASON_BACKOFF_LIMIT, REASON_POD_REJECTED, failed_reason, set_conditions, spec_rejected,
};
use crate::events::{EventSpec, transitions};
use crate::observe::PodView;
use crate::policy::SpecRejection;
use crate::step::{Backoff, FoldRules, StepState, fold_steps};

/// Operator settings that shape decisions.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub backoff: Backoff,
    /// How long the kubelet may fail to start a pod's container before the
    /// attempt counts as failed ([`crate::step::FoldRules::start_timeout`]).
    pub start_timeout: Duration,
    /// How often an active job is looked at even without any event.
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            backoff: Backoff::default(),
            start_timeout: Duration::from_secs(300),
            resync: Duration::from_secs(300),
        }
    }
}

/// A pod to create: one attempt of a step, under its one name, with its task.
#[derive(Clone, Debug, PartialEq)]
pub struct NewPod {
    pub name: String,
    pub attempt: StepAttempt,
    pub task: Task,
}

impl NewPod {
    /// Attempt `attempt` of a step of `job`, planned as `plan`.
    pub fn new(job: &TravelJob, plan: &Plan, attempt: StepAttempt) -> NewPod {
        NewPod {
            name: attempt.pod_name(&job.name_any()),
            attempt,
            task: Task::new(job, plan, attempt.step),
        }
    }
}

/// Everything one reconcile does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub status: TravelJobStatus,
    pub create: Vec<NewPod>,
    /// Pods to delete, by name.
    pub delete: Vec<String>,
    pub events: Vec<EventSpec>,
    /// Delete the TravelJob itself (ttlSecondsAfterFinished elapsed).
    pub delete_job: bool,
    pub requeue: Option<Duration>,
}

/// Decides one reconcile of `job`, given its plan (or why its spec gets no
/// pods: [`crate::policy::SpecPolicy::admit`]) and its pods.
pub fn decide(
    job: &TravelJob,
    plan: &Result<Plan, SpecRejection>,
    pods: &[PodView],
    settings: &Settings,
    now: Timestamp,
) -> Decision {
    let prev = job.status.clone().unwrap_or_default();
    let mut d = if prev.phase.is_finished() && !spec_rejected(&prev) {
        // A finished job stays finished (unless its spec was rejected and may
        // have changed since): only its TTL and stray pods are handled.
        Decision {
            status: prev,
            delete: active_pods(pods),
            ..Default::default()
        }
    } else {
        match plan {
            // Old API servers (the v1.20 test one too) ignore the CRD's CEL
            // rules: the spec is validated here.
            Err(rejection) => rejected(job, &prev, rejection, pods, now),
            Ok(plan) => advance(job, plan, &prev, pods, settings, now),
        }
    };
    d.status.observed_generation = job.metadata.generation;
    if d.status.phase.is_finished() {
        finish_ttl(job, now, &mut d);
    }
    d
}

/// How long a pod the API server could not create (a quota, an admission
/// webhook, the server unavailable) waits before it is tried again: 15 s after
/// the first refusal, doubling with each refusal in a row, up to 5 minutes. The
/// kube Job controller backs failed pods off the same way (10 s doubling to
/// 6 min, as [`Backoff::default`] does here); a quota that stays full for an
/// hour then costs 16 refused creations (each with its status patch and event)
/// instead of 240. The cap is no longer than the default resync (300 s), which
/// looks at the job by then anyway.
pub const CREATE_BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(15),
    max: Duration::from_secs(300),
};

/// The API server could not create `pod` for a reason that may pass (403 from
/// a ResourceQuota or Pod Security admission, 5xx, a timeout): its step shows
/// why and waits, a warning event says so, and the job is reconciled again
/// after [`CREATE_BACKOFF`]'s wait for this many refusals in a row (the attempt
/// is not used up: no pod ran). That wait is the longest one: a reconcile
/// before it (a pod of the job changed, perhaps one that finished and freed
/// the quota) tries at once. `job` is the job `d` was decided from.
pub fn pod_not_created(job: &TravelJob, d: &mut Decision, pod: &NewPod, why: &str) {
    let StepAttempt { step, attempt } = pod.attempt;
    // `d` shows the pod as created, which ends the count: the refusals before
    // this one are in the status it was decided from.
    let refusals = job
        .status
        .as_ref()
        .and_then(|s| s.step(step))
        .map_or(0, |s| s.create_refusals)
        .saturating_add(1);
    let wait = CREATE_BACKOFF.delay(refusals);
    let refused = format!("pod {} could not be created: {why}", pod.name);
    let message = format!("{refused}; trying again in {}s", wait.as_secs());
    if let Some(s) = d.status.step_mut(step) {
        not_created(s, attempt);
        s.create_refusals = refusals;
        s.message = Some(message.clone());
    }
    d.status.message = Some(format!("{step}: {message}"));
    d.requeue = Some(d.requeue.map_or(wait, |r| r.min(wait)));
    // One event per refusal. The event recorder folds the repeats about one
    // pod into a series that keeps the first note, so the note leaves out the
    // wait, which grows (the status says it).
    d.events.push(
        EventSpec::warning("FailedCreatePod", format!("{step}: {refused}"))
            .for_action("CreatePod")
            .about(Some(pod.name.clone())),
    );
}

/// `pod` was decided in the same reconcile as one the API server could not
/// create or refused, after it: it was never tried, so its step waits again
/// (no refusal counted, no event) and the next reconcile decides it anew.
/// Left as created, it would count as a failed attempt once
/// [`VANISHED_AFTER`](crate::step::VANISHED_AFTER) found no pod.
pub fn pod_not_tried(d: &mut Decision, pod: &NewPod) {
    let StepAttempt { step, attempt } = pod.attempt;
    if let Some(s) = d.status.step_mut(step) {
        not_created(s, attempt);
        s.message = Some(format!(
            "waiting: pod {} was not created (one before it could not be)",
            pod.name
        ));
    }
}

/// A step whose pod for `attempt` was not created: back to waiting, the
/// attempt not used up.
fn not_created(s: &mut StepStatus, attempt: u32) {
    s.phase = StepPhase::Pending;
    s.pod = None;
    s.start_time = None;
    s.attempts = attempt - 1;
}

/// The API server refused `pod` itself (a bad quantity, a forbidden field):
/// retrying cannot help, so the job fails.
pub fn pod_refused(job: &TravelJob, d: &mut Decision, pod: &NewPod, why: &str, now: Timestamp) {
    let message = format!(
        "the API server rejected pod {} for {}: {why}",
        pod.name, pod.attempt.step
    );
    d.status.phase = JobPhase::Failed;
    d.status.message = Some(message.clone());
    d.status.completion_time = Some(Time(now));
    set_conditions(
        &mut d.status,
        REASON_POD_REJECTED,
        job.metadata.generation,
        now,
    );
    d.events.push(
        EventSpec::warning(REASON_POD_REJECTED, message)
            .for_action("CreatePod")
            .about(Some(pod.name.clone())),
    );
}

fn active_pods(pods: &[PodView]) -> Vec<String> {
    pods.iter()
        .filter(|p| p.is_active())
        .map(|p| p.name.clone())
        .collect()
}

/// The spec does not validate or is forbidden here: the job fails with every
/// problem named, once.
fn rejected(
    job: &TravelJob,
    prev: &TravelJobStatus,
    rejection: &SpecRejection,
    pods: &[PodView],
    now: Timestamp,
) -> Decision {
    let mut status = prev.clone();
    status.phase = JobPhase::Failed;
    status.message = Some(rejection.message.clone());
    status.completion_time = prev.completion_time.clone().or(Some(Time(now)));
    set_conditions(&mut status, rejection.reason, job.metadata.generation, now);
    let said_before =
        failed_reason(prev) == Some(rejection.reason) && prev.message == status.message;
    Decision {
        status,
        delete: active_pods(pods),
        events: if said_before {
            Vec::new()
        } else {
            vec![EventSpec::warning(
                rejection.reason,
                rejection.message.clone(),
            )]
        },
        ..Default::default()
    }
}

/// A valid, unfinished job: its steps folded from its pods, then failed,
/// succeeded, suspended, or moved on by starting what is ready.
fn advance(
    job: &TravelJob,
    plan: &Plan,
    prev: &TravelJobStatus,
    pods: &[PodView],
    settings: &Settings,
    now: Timestamp,
) -> Decision {
    let mut d = Decision {
        status: prev.clone(),
        ..Default::default()
    };
    if spec_rejected(prev) {
        // The spec was fixed: start over.
        d.status.completion_time = None;
        d.status.message = None;
    }
    let rules = FoldRules {
        backoff_limit: job.spec.backoff_limit,
        backoff: settings.backoff,
        start_timeout: settings.start_timeout,
        suspended: job.spec.suspend,
        now,
    };
    let mut steps = fold_steps(plan, pods, prev, &rules);
    // Pods whose container could not be started hold a GPU for nothing.
    d.delete = steps.iter().flat_map(|s| s.delete.clone()).collect();
    let mut reason = "";
    if let Some(failed) = steps.iter().find(|s| s.phase == StepPhase::Failed) {
        fail(&mut d, failed, &steps, prev, pods, now);
        // A step a VLM policy failed says why; any other ran out of retries.
        reason =
            policy_failure_reason(failed.status.report.as_ref()).unwrap_or(REASON_BACKOFF_LIMIT);
    } else if let Some(stitch) = steps
        .iter()
        .find(|s| s.step == StepId::Stitch && s.phase == StepPhase::Succeeded)
    {
        d.status.phase = JobPhase::Succeeded;
        d.status.completion_time = prev
            .completion_time
            .clone()
            .or_else(|| stitch.status.finish_time.clone())
            .or(Some(Time(now)));
    } else if job.spec.suspend {
        d.status.phase = JobPhase::Suspended;
        d.status.message = Some("suspended: no new pods start and running ones are stopped".into());
        d.delete = active_pods(pods);
    } else {
        start_ready(job, plan, &mut steps, &mut d, now);
    }

    let step_statuses = steps.iter().map(|s| (s.step, s.status.clone())).collect();
    d.status.fold_steps(plan, &step_statuses, &job.output_dir());
    if d.status.phase == JobPhase::Succeeded {
        d.status.message = Some(success_message(plan, &d.status));
    }
    set_conditions(&mut d.status, reason, job.metadata.generation, now);
    d.events.extend(transitions(prev, &d.status, &steps));
    if !d.status.phase.is_finished() && d.status.phase != JobPhase::Suspended {
        let resync = settings.resync;
        d.requeue = Some(d.requeue.map_or(resync, |r| r.min(resync)));
    }
    d
}

/// A step is out of retries: the job fails, nothing downstream starts, and
/// what is still running is stopped.
fn fail(
    d: &mut Decision,
    failed: &StepState,
    steps: &[StepState],
    prev: &TravelJobStatus,
    pods: &[PodView],
    now: Timestamp,
) {
    let blocked: Vec<String> = steps
        .iter()
        .filter(|s| s.phase == StepPhase::Pending)
        .map(|s| s.step.to_string())
        .collect();
    let not_started = if blocked.is_empty() {
        String::new()
    } else {
        format!("; not started: {}", blocked.join(", "))
    };
    d.status.phase = JobPhase::Failed;
    d.status.message = Some(format!(
        "{} {}{not_started}",
        failed.step,
        failed.status.message.as_deref().unwrap_or_default()
    ));
    d.status.completion_time = prev.completion_time.clone().or(Some(Time(now)));
    d.delete = active_pods(pods);
}

/// Starts the steps that are ready and the retries whose backoff elapsed; the
/// other retries say when to look again.
fn start_ready(
    job: &TravelJob,
    plan: &Plan,
    steps: &mut [StepState],
    d: &mut Decision,
    now: Timestamp,
) {
    let done: BTreeSet<StepId> = steps
        .iter()
        .filter(|s| s.phase == StepPhase::Succeeded)
        .map(|s| s.step)
        .collect();
    let busy: BTreeSet<StepId> = steps
        .iter()
        .filter(|s| s.is_active() || s.terminating)
        .map(|s| s.step)
        .collect();
    let mut starting = plan.ready_steps(&done, &busy);
    for s in steps
        .iter()
        .filter(|s| s.phase == StepPhase::Retrying && !s.terminating)
    {
        match s.retry_at {
            Some(at) if at > now => {
                let wait = until(now, at);
                d.requeue = Some(d.requeue.map_or(wait, |r| r.min(wait)));
            }
            _ => starting.push(s.step),
        }
    }
    for s in steps.iter_mut().filter(|s| starting.contains(&s.step)) {
        let pod = NewPod::new(job, plan, s.step.attempt(s.next_attempt));
        s.start(&pod.name, now);
        d.create.push(pod);
    }
    d.status.phase = running_phase(steps);
    d.status.message = Some(progress_message(steps));
    if d.status.start_time.is_none() {
        d.status.start_time = Some(Time(now));
    }
    d.status.completion_time = None;
}

/// The job's phase while it runs, from its steps.
fn running_phase(steps: &[StepState]) -> JobPhase {
    let active = |step: StepId| steps.iter().any(|s| s.step == step && s.is_active());
    let segment_started = steps
        .iter()
        .any(|s| matches!(s.step, StepId::Segment(_)) && s.phase != StepPhase::Pending);
    let prompts_done = steps
        .iter()
        .any(|s| s.step == StepId::Prompts && s.phase == StepPhase::Succeeded);
    if active(StepId::Stitch) {
        JobPhase::Stitching
    } else if segment_started || prompts_done {
        JobPhase::Generating
    } else if active(StepId::Prompts) {
        JobPhase::Prompting
    } else {
        JobPhase::Pending
    }
}

/// What the active steps are doing, or "waiting".
fn progress_message(steps: &[StepState]) -> String {
    let active: Vec<String> = steps
        .iter()
        .filter(|s| s.is_active())
        .map(|s| {
            format!(
                "{}: {}",
                s.step,
                s.status.message.as_deref().unwrap_or_default()
            )
        })
        .collect();
    if active.is_empty() {
        "waiting".into()
    } else {
        active.join("; ")
    }
}

/// The final video, its length and the model that made it.
fn success_message(plan: &Plan, status: &TravelJobStatus) -> String {
    match &status.output {
        Some(out) => format!(
            "wrote {out} ({} frames at {} fps) with {}",
            plan.total_frames,
            plan.fps,
            plan.video_model_label()
        ),
        None => "succeeded".into(),
    }
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let secs = at.duration_since(now).as_secs_f64();
    Duration::from_secs_f64(secs.max(0.0)).max(Duration::from_millis(200))
}

/// TTL after finishing: delete the job when it elapsed, else look again then.
fn finish_ttl(job: &TravelJob, now: Timestamp, d: &mut Decision) {
    let (Some(ttl), Some(done)) = (
        job.spec.ttl_seconds_after_finished,
        &d.status.completion_time,
    ) else {
        return;
    };
    let at = done.0 + Duration::from_secs(ttl.max(0) as u64);
    if at <= now {
        d.delete_job = true;
        d.requeue = None;
    } else {
        d.requeue = Some(until(now, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{COND_FAILED, REASON_INVALID};
    use crate::fixtures::{SPEC, job, t, view};
    use crate::observe::PodPhase;
    use kubewan_crds::RunReport;
    use kubewan_crds::conditions::COND_PROMPTS_FELL_BACK;
    use kubewan_crds::report::{PromptOutcome, VlmIssue};

    /// Runs a decision and stores its status into the job, as the API would.
    fn step(job: &mut TravelJob, pods: &[PodView], now: i64) -> Decision {
        let plan = Plan::validated(&job.spec).map_err(SpecRejection::from);
        let d = decide(job, &plan, pods, &Settings::default(), t(now));
        job.status = Some(d.status.clone());
        d
    }

    fn created(d: &Decision) -> Vec<StepAttempt> {
        d.create.iter().map(|p| p.attempt).collect()
    }

    const NO_VLM: &str = "enhancePrompt: {enabled: false}\n";

    #[test]
    fn a_new_job_starts_its_first_segment() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let d = step(&mut j, &[], 0);
        assert_eq!(created(&d), vec![StepId::Segment(0).attempt(1)]);
        let pod = &d.create[0];
        assert_eq!(pod.name, "trip-seg-0-1");
        assert_eq!(
            (
                pod.task.step,
                pod.task.job.as_str(),
                pod.task.output_dir.as_str()
            ),
            (StepId::Segment(0), "studio/trip", "videos/studio/trip")
        );
        assert_eq!(d.status.phase, JobPhase::Generating);
        assert_eq!(d.status.video_model.as_deref(), Some("preview (preview)"));
        assert_eq!(
            d.status.segments[0].step.pod.as_deref(),
            Some("trip-seg-0-1")
        );
        assert_eq!(d.status.progress.as_deref(), Some("0/2"));
        assert_eq!(d.status.observed_generation, Some(3));
        assert!(
            d.events.is_empty(),
            "starting is progress, not news: {:?}",
            d.events
        );
        assert!(d.requeue.is_some());
    }

    #[test]
    fn with_the_vlm_prompts_come_first() {
        let mut j = job(SPEC);
        let d = step(&mut j, &[], 0);
        assert_eq!(created(&d), vec![StepId::Prompts.attempt(1)]);
        assert_eq!(d.status.phase, JobPhase::Prompting);
    }

    #[test]
    fn the_same_pods_give_the_same_decision_after_a_restart() {
        // A running pod: nothing is created again, whatever the status says.
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let pods = [view(StepId::Segment(0), 1, PodPhase::Running)];
        let d = step(&mut j, &pods, 1);
        assert!(d.create.is_empty(), "{:?}", d.create);
        j.status = None; // an operator that lost everything but the pods
        let d = step(&mut j, &pods, 2);
        assert!(d.create.is_empty(), "{:?}", d.create);
        assert_eq!(d.status.segments[0].step.phase, StepPhase::Running);
    }

    #[test]
    fn the_whole_chain_runs_to_success() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let mut pods = vec![view(StepId::Segment(0), 1, PodPhase::Succeeded)];
        assert_eq!(
            created(&step(&mut j, &pods, 11)),
            vec![StepId::Segment(1).attempt(1)]
        );
        pods.push(view(StepId::Segment(1), 1, PodPhase::Succeeded));
        assert_eq!(
            created(&step(&mut j, &pods, 12)),
            vec![StepId::Stitch.attempt(1)]
        );
        assert_eq!(j.status.as_ref().unwrap().phase, JobPhase::Stitching);
        pods.push(view(StepId::Stitch, 1, PodPhase::Succeeded));
        let d = step(&mut j, &pods, 13);
        assert!(d.create.is_empty());
        let s = &d.status;
        assert_eq!(s.phase, JobPhase::Succeeded);
        assert_eq!(s.output.as_deref(), Some("videos/studio/trip/stitch.mp4"));
        assert_eq!(
            s.message.as_deref(),
            Some(
                "wrote videos/studio/trip/stitch.mp4 (146 frames at 16 fps) with preview (preview)"
            )
        );
        assert_eq!(
            s.segments[1].output.as_deref(),
            Some("videos/studio/trip/segment-1.mp4")
        );
        assert_eq!(s.progress.as_deref(), Some("2/2"));
        assert_eq!(s.memory.as_ref().unwrap().peak_ram, "100.0MiB");
        assert_eq!(
            s.memory.as_ref().unwrap().peak_vram.as_deref(),
            Some("no GPU")
        );
        assert!(s.completion_time.is_some());
        let succeeded = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Succeeded")
            .unwrap();
        assert_eq!(succeeded.status, "True");
        assert!(d.events.iter().any(|e| e.reason == "Succeeded"));
        assert_eq!(d.requeue, None, "nothing to wait for without a TTL");
        // And it stays succeeded.
        let again = step(&mut j, &pods, 100);
        assert_eq!(again.status.phase, JobPhase::Succeeded);
        assert!(again.events.is_empty());
    }

    #[test]
    fn a_failing_segment_is_retried_with_backoff_then_fails_the_job() {
        let mut j = job(&format!("{SPEC}{NO_VLM}backoffLimit: 1\n"));
        let mut pods = vec![view(StepId::Segment(0), 1, PodPhase::Failed)]; // finished at 10
        let d = step(&mut j, &pods, 12);
        assert!(d.create.is_empty(), "waits for the backoff");
        assert_eq!(d.requeue, Some(Duration::from_secs(8)));
        assert_eq!(d.status.segments[0].step.phase, StepPhase::Retrying);
        assert!(d.events.iter().any(|e| e.reason == "BackOff" && e.warning));
        let d = step(&mut j, &pods, 20);
        assert_eq!(created(&d), vec![StepId::Segment(0).attempt(2)]);
        assert_eq!(d.create[0].name, "trip-seg-0-2");
        pods.push(view(StepId::Segment(0), 2, PodPhase::Failed));
        let d = step(&mut j, &pods, 40);
        assert!(d.create.is_empty(), "no dependant starts");
        assert_eq!(d.status.phase, JobPhase::Failed);
        let msg = d.status.message.clone().unwrap();
        assert!(msg.starts_with("segment 0 failed after 2 attempts (pod trip-seg-0-2): exit code 1: keyframe missing"), "{msg}");
        assert!(msg.contains("not started: segment 1, stitch"), "{msg}");
        let failed = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == COND_FAILED)
            .unwrap();
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", REASON_BACKOFF_LIMIT)
        );
        assert!(d.events.iter().any(|e| e.reason == "Failed" && e.warning));
    }

    #[test]
    fn a_parallel_failure_stops_the_other_segments() {
        let mut j = job(&format!("{SPEC}{NO_VLM}backoffLimit: 0\nchain: false\n"));
        let pods = [
            view(StepId::Segment(0), 1, PodPhase::Failed),
            view(StepId::Segment(1), 1, PodPhase::Running),
        ];
        let d = step(&mut j, &pods, 12);
        assert_eq!(d.status.phase, JobPhase::Failed);
        assert_eq!(d.delete, vec!["trip-seg-1-1".to_string()]);
        assert!(d.create.is_empty());
    }

    #[test]
    fn an_invalid_spec_fails_with_every_problem_named() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        j.spec.keyframes = vec!["a.png".into(), "../../etc/passwd".into()];
        let d = step(&mut j, &[], 0);
        assert_eq!(d.status.phase, JobPhase::Failed);
        assert!(d.create.is_empty());
        let msg = d.status.message.clone().unwrap();
        assert!(
            msg.contains("spec.keyframes[1]") && msg.contains("'..'"),
            "{msg}"
        );
        assert!(d.events.iter().any(|e| e.reason == REASON_INVALID));
        // The same invalid spec again: no new event.
        assert!(step(&mut j, &[], 1).events.is_empty());
        // Fixed: it starts.
        j.spec.keyframes = vec!["a.png".into(), "b.png".into()];
        let d = step(&mut j, &[], 2);
        assert_eq!(created(&d), vec![StepId::Segment(0).attempt(1)]);
        assert_eq!(d.status.phase, JobPhase::Generating);
    }

    #[test]
    fn suspend_stops_pods_and_resume_continues() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let mut pods = vec![
            view(StepId::Segment(0), 1, PodPhase::Succeeded),
            view(StepId::Segment(1), 1, PodPhase::Running),
        ];
        step(&mut j, &pods, 11);
        j.spec.suspend = true;
        let d = step(&mut j, &pods, 12);
        assert_eq!(d.status.phase, JobPhase::Suspended);
        assert_eq!(d.delete, vec!["trip-seg-1-1".to_string()]);
        assert!(d.create.is_empty());
        let suspended = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Suspended")
            .unwrap();
        assert_eq!(suspended.status, "True");
        pods[1].deletion = Some(t(40));
        assert!(step(&mut j, &pods, 13).create.is_empty());
        pods.pop(); // gone
        j.spec.suspend = false;
        let d = step(&mut j, &pods, 14);
        assert_eq!(
            created(&d),
            vec![StepId::Segment(1).attempt(2)],
            "segment 0 is not redone; the stopped attempt's pod name is not reused"
        );
        assert_eq!(d.status.segments[1].step.failed_attempts, Vec::<u32>::new());
        assert_eq!(d.status.phase, JobPhase::Generating);
        assert!(d.events.iter().any(|e| e.reason == "Resumed"));
    }

    #[test]
    fn ttl_deletes_the_job_after_it_finished() {
        let mut j = job(&format!(
            "{SPEC}{NO_VLM}ttlSecondsAfterFinished: 30\nbackoffLimit: 0\n"
        ));
        let pods = [view(StepId::Segment(0), 1, PodPhase::Failed)];
        let d = step(&mut j, &pods, 10);
        assert_eq!(d.status.phase, JobPhase::Failed);
        assert_eq!(d.requeue, Some(Duration::from_secs(30)));
        assert!(!d.delete_job);
        assert!(step(&mut j, &pods, 40).delete_job);
    }

    #[test]
    fn parallel_segments_respect_parallelism_and_retries_hold_their_slot() {
        let mut j = job(&format!("{SPEC}{NO_VLM}chain: false\nparallelism: 1\n"));
        j.spec.keyframes = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        let d = step(&mut j, &[], 0);
        assert_eq!(created(&d), vec![StepId::Segment(0).attempt(1)]);
        let pods = [view(StepId::Segment(0), 1, PodPhase::Failed)];
        let d = step(&mut j, &pods, 11);
        assert!(d.create.is_empty(), "{:?}", d.create);
    }

    /// One pod's life as the pod watch shows it: created (its time is the
    /// pod's creation), started by the kubelet, running, succeeded.
    fn life(step: StepId, created: i64) -> [PodView; 4] {
        let at = |phase, started| PodView {
            started: Some(t(started)),
            ..view(step, 1, phase)
        };
        [
            at(PodPhase::Pending, created),
            at(PodPhase::Pending, created + 1),
            at(PodPhase::Running, created + 1),
            at(PodPhase::Succeeded, created + 1),
        ]
    }

    #[test]
    fn the_happy_path_writes_status_once_per_pod_and_the_end_and_one_event() {
        // One segment and the stitch: issue 14's cheapest job.
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        j.spec.keyframes.truncate(2);
        let (mut writes, mut events) = (0, Vec::new());
        let mut reconcile = |j: &mut TravelJob, pods: &[PodView], now: i64| {
            let before = j.status.clone();
            let d = step(j, pods, now);
            writes += usize::from(before.as_ref() != Some(&d.status));
            events.extend(d.events.iter().map(|e| e.reason.clone()));
            d
        };
        assert_eq!(created(&reconcile(&mut j, &[], 0)).len(), 1);
        let mut now = 1;
        for seg in life(StepId::Segment(0), 0) {
            let d = reconcile(&mut j, &[seg], now);
            now += 1;
            if d.status.segments[0].step.phase == StepPhase::Succeeded {
                assert_eq!(created(&d), vec![StepId::Stitch.attempt(1)]);
            }
        }
        let seg = life(StepId::Segment(0), 0)[3].clone();
        for stitch in life(StepId::Stitch, now) {
            reconcile(&mut j, &[seg.clone(), stitch], now);
            now += 1;
        }
        assert_eq!(j.status.as_ref().unwrap().phase, JobPhase::Succeeded);
        assert_eq!(
            writes, 3,
            "segment started, stitch started with the segment's success, done"
        );
        assert_eq!(events, ["Succeeded"]);
    }

    #[test]
    fn a_pod_that_starts_and_runs_writes_no_status_but_one_that_waits_says_why() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let first = step(&mut j, &[], 0).status;
        let message = first.segments[0].step.message.clone();
        assert_eq!(message.as_deref(), Some("running in pod trip-seg-0-1"));
        for seg in &life(StepId::Segment(0), 0)[..3] {
            assert_eq!(step(&mut j, std::slice::from_ref(seg), 2).status, first);
        }
        let mut stuck = view(StepId::Segment(0), 1, PodPhase::Pending);
        stuck.waiting = Some("ImagePullBackOff".into());
        let d = step(&mut j, &[stuck], 3);
        assert_eq!(
            d.status.segments[0].step.message.as_deref(),
            Some("pod trip-seg-0-1 is pending: ImagePullBackOff")
        );
    }

    const QUOTA_FULL: &str = "pods \"trip-seg-0-1\" is forbidden: exceeded quota: gpus";

    /// A reconcile whose pod creation the API server refuses (a full quota),
    /// as apply folds it back; its status stored into the job through JSON,
    /// as the API would (all an operator that restarts has to go on).
    fn refused(job: &mut TravelJob, pods: &[PodView], now: i64) -> Decision {
        let decided_from = job.clone();
        let mut d = step(job, pods, now);
        let pod = d.create[0].clone();
        pod_not_created(&decided_from, &mut d, &pod, QUOTA_FULL);
        let stored = serde_json::to_value(&d.status).unwrap();
        job.status = Some(serde_json::from_value(stored).unwrap());
        d
    }

    fn segment_0(d: &Decision) -> &StepStatus {
        d.status.step(StepId::Segment(0)).unwrap()
    }

    #[test]
    fn a_pod_the_server_could_not_create_waits_with_the_reason_shown() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let d = refused(&mut j, &[], 0);
        let seg = segment_0(&d);
        assert_eq!(
            (
                seg.phase,
                seg.pod.as_deref(),
                seg.attempts,
                seg.create_refusals
            ),
            (StepPhase::Pending, None, 0, 1)
        );
        let expected =
            format!("pod trip-seg-0-1 could not be created: {QUOTA_FULL}; trying again in 15s");
        assert_eq!(seg.message.as_deref(), Some(expected.as_str()));
        assert!(!d.status.phase.is_finished(), "nothing failed yet");
        assert_eq!(d.requeue, Some(Duration::from_secs(15)));
        let event = d.events.last().unwrap();
        assert!(
            event.warning && event.reason == "FailedCreatePod",
            "{event:?}"
        );
        assert_eq!(
            event.note,
            format!("segment 0: pod trip-seg-0-1 could not be created: {QUOTA_FULL}"),
            "a series of these events keeps its first note: no wait in it"
        );
        // The next reconcile, with no pod, creates attempt 1 again.
        let again = step(&mut j, &[], 20);
        assert_eq!(again.create[0].name, "trip-seg-0-1");
    }

    /// Issue 14: a quota that stayed full was asked every 15 s, for ever.
    #[test]
    fn refused_creations_in_a_row_wait_twice_as_long_each_time_up_to_five_minutes() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let (mut now, mut waits) = (0, Vec::new());
        for refusal in 1..=8 {
            if refusal == 3 {
                // A reconcile that does not try (suspended, then resumed):
                // the count is not lost by the fold.
                j.spec.suspend = true;
                let d = step(&mut j, &[], now);
                assert_eq!(segment_0(&d).create_refusals, 2);
                j.spec.suspend = false;
            }
            let d = refused(&mut j, &[], now);
            assert_eq!(created(&d), vec![StepId::Segment(0).attempt(1)]);
            let wait = d.requeue.unwrap().as_secs();
            let seg = segment_0(&d);
            assert_eq!(seg.create_refusals, refusal);
            let message = seg.message.clone().unwrap_or_default();
            assert!(
                message.ends_with(&format!("; trying again in {wait}s")),
                "{message}"
            );
            let failed_creations: Vec<_> = d
                .events
                .iter()
                .filter(|e| e.reason == "FailedCreatePod")
                .collect();
            assert_eq!(failed_creations.len(), 1, "one event per refusal");
            waits.push(wait);
            now += wait as i64;
        }
        assert_eq!(waits, [15, 30, 60, 120, 240, 300, 300, 300]);
        let stored = serde_json::to_value(&j.status).unwrap();
        assert_eq!(stored["segments"][0]["createRefusals"], 8);
    }

    #[test]
    fn a_created_pod_starts_the_refusal_count_over() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        refused(&mut j, &[], 0);
        refused(&mut j, &[], 15);
        let d = refused(&mut j, &[], 45);
        assert_eq!(d.requeue, Some(Duration::from_secs(60)));
        // The quota allows it now.
        let d = step(&mut j, &[], 105);
        assert_eq!(created(&d), vec![StepId::Segment(0).attempt(1)]);
        assert_eq!(segment_0(&d).create_refusals, 0);
        let stored = serde_json::to_value(&d.status).unwrap();
        assert!(
            stored["segments"][0].get("createRefusals").is_none(),
            "{stored}"
        );
        // The pod fails, and its retry finds the quota full again: the wait
        // starts over at 15 s.
        let failed = [view(StepId::Segment(0), 1, PodPhase::Failed)];
        let d = refused(&mut j, &failed, 200);
        assert_eq!(created(&d), vec![StepId::Segment(0).attempt(2)]);
        assert_eq!(segment_0(&d).create_refusals, 1);
        assert_eq!(d.requeue, Some(Duration::from_secs(15)));
    }

    #[test]
    fn pods_after_one_that_could_not_be_created_wait_and_are_no_failed_attempt() {
        let mut j = job(&format!("{SPEC}{NO_VLM}chain: false\nparallelism: 2\n"));
        let decided_from = j.clone();
        let mut d = step(&mut j, &[], 0);
        let [first, second] = <[NewPod; 2]>::try_from(d.create.clone()).unwrap();
        pod_not_created(&decided_from, &mut d, &first, QUOTA_FULL);
        pod_not_tried(&mut d, &second);
        let later = d.status.step(StepId::Segment(1)).unwrap();
        assert_eq!(
            (later.phase, later.pod.as_deref(), later.attempts),
            (StepPhase::Pending, None, 0)
        );
        assert_eq!(later.create_refusals, 0);
        assert_eq!(d.events.len(), 1, "one event, for the refused pod");
        // Well past VANISHED_AFTER with no pod in the cache: both steps are
        // tried again as first attempts, no failure counted.
        j.status = Some(d.status.clone());
        let d = step(&mut j, &[], 60);
        assert_eq!(
            created(&d),
            vec![StepId::Segment(0).attempt(1), StepId::Segment(1).attempt(1)]
        );
        assert!(
            d.status
                .segments
                .iter()
                .all(|s| s.step.failed_attempts.is_empty()),
            "{:?}",
            d.status.segments
        );
    }

    #[test]
    fn a_refused_pod_fails_the_job() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let mut d = step(&mut j, &[], 0);
        let pod = d.create[0].clone();
        pod_refused(&j, &mut d, &pod, "quantities must match", t(1));
        let s = &d.status;
        assert_eq!(s.phase, JobPhase::Failed);
        assert_eq!(
            s.message.as_deref(),
            Some("the API server rejected pod trip-seg-0-1 for segment 0: quantities must match")
        );
        assert_eq!(s.completion_time, Some(Time(t(1))));
        assert_eq!(failed_reason(s), Some(REASON_POD_REJECTED));
        let event = d.events.last().unwrap();
        assert!(event.warning && event.reason == REASON_POD_REJECTED);
        assert_eq!(event.pod.as_deref(), Some("trip-seg-0-1"));
        // The next reconcile keeps it failed and stops what was started.
        j.status = Some(d.status.clone());
        let d = step(&mut j, &[view(StepId::Segment(0), 1, PodPhase::Running)], 2);
        assert_eq!(d.status.phase, JobPhase::Failed);
        assert_eq!(d.delete, vec!["trip-seg-0-1".to_string()]);
    }

    /// The prompts pod's report: the VLM was refused, and what the policy made of it.
    fn refused_prompts(view_phase: PodPhase, policy_failure: bool) -> PodView {
        let mut v = view(StepId::Prompts, 1, view_phase);
        let cause = Some(VlmIssue::VlmRefused);
        v.report = Some(RunReport {
            step: StepId::Prompts,
            ok: !policy_failure,
            prompts: if policy_failure {
                Vec::new()
            } else {
                (0..2)
                    .map(|segment| PromptOutcome {
                        segment,
                        prompt: "own".into(),
                        fell_back: true,
                        reason: Some("refusing phase vlm_generate".into()),
                        cause,
                        tokens: None,
                    })
                    .collect()
            },
            policy_failure: policy_failure.then_some(VlmIssue::VlmRefused),
            ..Default::default()
        });
        v
    }

    #[test]
    fn a_vlm_that_fell_back_is_a_condition_and_the_job_goes_on() {
        let mut j = job(SPEC);
        let d = step(&mut j, &[refused_prompts(PodPhase::Succeeded, false)], 11);
        assert_eq!(created(&d), vec![StepId::Segment(0).attempt(1)]);
        let c = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == COND_PROMPTS_FELL_BACK)
            .expect("a PromptsFellBack condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "VlmRefused")
        );
    }

    #[test]
    fn a_vlm_failed_by_its_policy_fails_the_job_with_the_cause_as_reason() {
        let mut j = job(&format!(
            "{SPEC}backoffLimit: 0\nenhancePrompt: {{onFailure: Fail}}\n"
        ));
        let d = step(&mut j, &[refused_prompts(PodPhase::Failed, true)], 11);
        assert_eq!(d.status.phase, JobPhase::Failed);
        assert!(d.create.is_empty());
        assert_eq!(failed_reason(&d.status), Some("VlmRefused"));
        assert!(
            d.status
                .conditions
                .iter()
                .all(|c| c.type_ != COND_PROMPTS_FELL_BACK),
            "nothing fell back"
        );
    }
}
