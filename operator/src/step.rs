//! One step's state machine: its pods (and its recorded status) folded into a
//! [`StepState`] — pending, running, retrying after an exponential [`Backoff`],
//! succeeded, or failed out of retries.
//!
//! Level-triggered: a step's state is derived from its pods every time, so an
//! operator that restarts reads the same state back and never starts a step twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubewan_crds::status::{StepPhase, StepStatus, TravelJobStatus};
use kubewan_crds::{Plan, RunReport, StepId};

use crate::observe::{PodPhase, PodView};

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

/// How long a pod may stay deleted-but-present past its grace period before
/// its node is taken for lost: a kubelet that does not answer never confirms
/// the deletion, and the step must not wait for ever.
pub const LOST_AFTER: Duration = Duration::from_secs(60);

/// A pod the status says was created and that the watch cache has never
/// shown, or no longer shows, is taken for removed only this long after its
/// creation (the cache may lag the create call by a moment).
pub const VANISHED_AFTER: Duration = Duration::from_secs(30);

/// What folding a step needs besides its pods.
#[derive(Clone, Copy, Debug)]
pub struct FoldRules {
    /// Retries allowed after the first attempt (`spec.backoffLimit`).
    pub backoff_limit: u32,
    pub backoff: Backoff,
    /// How long the kubelet may fail to start a pod's container (image pull,
    /// missing configuration) before the attempt counts as failed.
    pub start_timeout: Duration,
    /// The job is suspended: its pods are being stopped on purpose, which is
    /// not a failure.
    pub suspended: bool,
    pub now: Timestamp,
}

/// One step's state, derived from its pods.
#[derive(Clone, Debug, PartialEq)]
pub struct StepState {
    pub step: StepId,
    pub phase: StepPhase,
    /// Failed attempts so far, durable (from status as well as from pods).
    pub failures: u32,
    /// The attempt the next pod of this step will carry.
    pub next_attempt: u32,
    /// When a failed step may retry.
    pub retry_at: Option<Timestamp>,
    /// A pod of this step is still being deleted; nothing new may start until it is gone.
    pub terminating: bool,
    /// Pods of this step to delete: ones whose container the kubelet could
    /// not start in time (their attempt is counted as failed).
    pub delete: Vec<String>,
    pub status: StepStatus,
}

impl StepState {
    /// Running or waiting to retry: the step holds its slot.
    pub fn is_active(&self) -> bool {
        matches!(self.phase, StepPhase::Running | StepPhase::Retrying)
    }

    /// The step's next pod, `pod`, is being created now: it shows as running
    /// at once, and the creations refused before it are over (a refusal of
    /// this one counts on from the previous status: [`crate::decide::pod_not_created`]).
    pub fn start(&mut self, pod: &str, now: Timestamp) {
        self.phase = StepPhase::Running;
        self.status.phase = StepPhase::Running;
        self.status.attempts = self.next_attempt;
        self.status.create_refusals = 0;
        self.status.start_time = Some(Time(now));
        self.status.finish_time = None;
        self.status.message = Some(running_message(pod));
        self.status.pod = Some(pod.to_owned());
    }
}

/// Every step of the plan, folded from its pods and from what `previous` recorded.
pub fn fold_steps(
    plan: &Plan,
    pods: &[PodView],
    previous: &TravelJobStatus,
    rules: &FoldRules,
) -> Vec<StepState> {
    plan.steps()
        .into_iter()
        .map(|step| {
            let mine: Vec<&PodView> = pods.iter().filter(|p| p.step == step).collect();
            fold_step(step, &mine, previous.step(step), rules)
        })
        .collect()
}

/// One failed attempt, as seen now.
#[derive(Clone, Debug)]
struct AttemptFailure {
    pod: String,
    why: String,
    permanent: bool,
    /// When it failed, if its pod says so.
    at: Option<Timestamp>,
    /// Its pod is still there and must be deleted (it holds the GPU).
    delete: bool,
    /// The runner's report, when it wrote one.
    report: Option<RunReport>,
}

/// Folds the pods of one step, and what its status recorded, into its state.
pub fn fold_step(
    step: StepId,
    pods: &[&PodView],
    previous: Option<&StepStatus>,
    rules: &FoldRules,
) -> StepState {
    let prev = previous.cloned().unwrap_or_default();
    let mut failures: BTreeMap<u32, AttemptFailure> = pods
        .iter()
        .filter_map(|p| attempt_failure(p, rules).map(|f| (p.attempt, f)))
        .collect();
    if let Some(f) = vanished(&prev, pods, rules) {
        failures.entry(prev.attempts).or_insert(f);
    }
    let failed: BTreeSet<u32> = prev
        .failed_attempts
        .iter()
        .copied()
        .chain(failures.keys().copied())
        .collect();
    let latest = pods
        .iter()
        .map(|p| p.attempt)
        .chain([prev.attempts])
        .chain(failed.last().copied())
        .max()
        .unwrap_or(0);
    let mut state = StepState {
        step,
        phase: StepPhase::Pending,
        failures: failed.len() as u32,
        next_attempt: latest + 1,
        retry_at: None,
        terminating: pods.iter().any(|p| blocks(p, rules.now)),
        delete: failures
            .values()
            .filter(|f| f.delete)
            .map(|f| f.pod.clone())
            .collect(),
        status: StepStatus {
            attempts: latest,
            failed_attempts: failed.iter().copied().collect(),
            last_failure: prev.last_failure.clone(),
            // Until a pod of the step is created, the refusals before count
            // towards the next wait ([`crate::decide::pod_not_created`]).
            create_refusals: prev.create_refusals,
            ..Default::default()
        },
    };
    if let Some(done) = pods
        .iter()
        .copied()
        .filter(|p| p.phase == PodPhase::Succeeded)
        .max_by_key(|p| p.attempt)
    {
        state.phase = StepPhase::Succeeded;
        show_pod(&mut state, done, &prev);
        state.status.message = done.report.as_ref().and_then(|r| r.message.clone());
    } else if prev.phase == StepPhase::Succeeded {
        // A step recorded as succeeded stays succeeded even if its pods were
        // removed, so finished GPU work is never redone.
        state.phase = StepPhase::Succeeded;
        state.status = prev;
    } else if failed.contains(&latest) {
        // The first reason recorded for an attempt stands: a pod deleted
        // because it could not start is not then "deleted by someone".
        let recorded = prev.failed_attempts.contains(&latest) && prev.last_failure.is_some();
        let seen = failures.get(&latest).filter(|_| !recorded);
        failed_latest(&mut state, seen, &prev, rules);
    } else if let Some(pod) = pods
        .iter()
        .copied()
        .find(|p| p.attempt == latest && p.is_active())
    {
        state.phase = StepPhase::Running;
        show_pod(&mut state, pod, &prev);
        state.status.message = Some(pod_message(pod));
    } else if created_not_yet_seen(&prev, latest, pods, rules) {
        state.phase = StepPhase::Running;
        state.status = prev;
    } else if state.terminating {
        state.phase = StepPhase::Running;
        state.status.message = Some("waiting for the previous pod to terminate".into());
    }
    state.status.phase = state.phase;
    state
}

/// Why attempt `pod` failed, if it did: it failed; it was deleted before it
/// finished while the job was not suspended (by someone, an eviction, a lost
/// node); or its container could not be started in time.
fn attempt_failure(pod: &PodView, rules: &FoldRules) -> Option<AttemptFailure> {
    let failure = |why: String, delete: bool| AttemptFailure {
        pod: pod.name.clone(),
        why,
        permanent: pod.permanent,
        at: pod.finished,
        delete,
        report: pod.report.clone(),
    };
    match pod.phase {
        PodPhase::Succeeded => None,
        PodPhase::Failed => Some(failure(pod.failure.clone().unwrap_or_default(), false)),
        _ if pod.is_terminating() => (!rules.suspended).then(|| {
            failure(
                "the pod was deleted before it finished (evicted, its node lost, or deleted by someone)"
                    .into(),
                false,
            )
        }),
        PodPhase::Pending if pod.cannot_start => {
            let waited = pod.started.map_or(Duration::ZERO, |at| {
                rules.now.duration_since(at).unsigned_abs()
            });
            (pod.permanent || waited >= rules.start_timeout).then(|| {
                let why = pod.waiting.clone().unwrap_or_default();
                failure(
                    format!("its container could not be started: {why}"),
                    true,
                )
            })
        }
        _ => None,
    }
}

/// The pod status names as running, gone from the watch cache while the job
/// was not suspended: removed before it finished (force-deleted, its node
/// deleted and the pod garbage-collected).
fn vanished(prev: &StepStatus, pods: &[&PodView], rules: &FoldRules) -> Option<AttemptFailure> {
    let name = prev.pod.as_deref()?;
    let created = prev.start_time.as_ref()?.0;
    let old_enough = rules.now.duration_since(created).unsigned_abs() >= VANISHED_AFTER;
    let gone = !pods.iter().any(|p| p.name == name);
    (prev.phase == StepPhase::Running && gone && old_enough && !rules.suspended).then(|| {
        AttemptFailure {
            pod: name.to_owned(),
            why: "the pod was removed before it finished".into(),
            permanent: false,
            at: None,
            delete: false,
            report: None,
        }
    })
}

/// The status says the latest attempt's pod was created, and the watch cache
/// does not show it yet: the step runs (starting the attempt again would
/// make a second pod), until [`VANISHED_AFTER`] says it was removed.
fn created_not_yet_seen(
    prev: &StepStatus,
    latest: u32,
    pods: &[&PodView],
    rules: &FoldRules,
) -> bool {
    prev.phase == StepPhase::Running
        && prev.pod.is_some()
        && prev.attempts == latest
        && !rules.suspended
        && !pods.iter().any(|p| p.attempt == latest)
}

/// A pod being deleted holds its step until it is gone, unless its node has
/// not confirmed the deletion long past its grace period (a lost node).
fn blocks(pod: &PodView, now: Timestamp) -> bool {
    pod.deletion
        .is_some_and(|due| !pod.phase.is_finished() && due + LOST_AFTER > now)
}

/// The step's latest attempt failed: it retries after its backoff, or fails
/// when it is out of retries or retrying cannot help.
fn failed_latest(
    state: &mut StepState,
    seen: Option<&AttemptFailure>,
    prev: &StepStatus,
    rules: &FoldRules,
) {
    let pod = seen
        .map(|f| f.pod.clone())
        .or_else(|| prev.pod.clone())
        .unwrap_or_default();
    let why = seen
        .map(|f| f.why.clone())
        .or_else(|| prev.last_failure.clone())
        .unwrap_or_default();
    let permanent = seen.is_some_and(|f| f.permanent);
    // A pod that failed without a finish time of its own (rejected by the
    // kubelet, deleted) failed when the status first recorded it: taking
    // `now` at every reconcile would push its retry back for ever.
    let recorded = (prev.pod.as_deref() == Some(pod.as_str()))
        .then(|| prev.finish_time.as_ref().map(|t| t.0))
        .flatten();
    let at = seen.and_then(|f| f.at).or(recorded).unwrap_or(rules.now);
    state.status.pod = Some(pod.clone());
    state.status.start_time = prev.start_time.clone();
    state.status.finish_time = Some(Time(at));
    state.status.last_failure = Some(why.clone());
    state.status.report = seen
        .and_then(|f| f.report.clone())
        .or_else(|| prev.report.clone());
    let failures = state.failures;
    state.status.message = Some(if permanent || failures > rules.backoff_limit {
        state.phase = StepPhase::Failed;
        let retry = if permanent {
            "; another attempt cannot help"
        } else {
            ""
        };
        format!(
            "failed after {failures} attempt{} (pod {pod}): {why}{retry}",
            if failures == 1 { "" } else { "s" },
        )
    } else {
        state.phase = StepPhase::Retrying;
        let retry_at = at + rules.backoff.delay(failures);
        state.retry_at = Some(retry_at);
        let wait = retry_at.duration_since(rules.now).as_secs().max(0);
        format!(
            "attempt {failures} of {} failed (pod {pod}): {why}; retrying in {wait}s",
            rules.backoff_limit + 1,
        )
    });
}

/// The status fields read from the step's current pod.
fn show_pod(state: &mut StepState, pod: &PodView, prev: &StepStatus) {
    state.status.pod = Some(pod.name.clone());
    // The pod exists, so its creation went through (even if the status that
    // said so was never written).
    state.status.create_refusals = 0;
    // The time recorded when the step started this pod stays: the pod's own
    // times (created, then started by the kubelet) would rewrite the status twice.
    state.status.start_time = prev
        .start_time
        .clone()
        .filter(|_| prev.pod.as_deref() == Some(pod.name.as_str()))
        .or(pod.started.map(Time));
    state.status.finish_time = pod.finished.map(Time);
    // A running retry keeps the last known report.
    state.status.report = pod.report.clone().or_else(|| prev.report.clone());
}

/// What a running step says while its pod is created, starts and runs.
fn running_message(pod: &str) -> String {
    format!("running in pod {pod}")
}

/// What the step's status says about its running or pending pod: one message
/// from creation to the end, unless the pod is stuck (a pod that merely
/// starts is no news worth a status write).
fn pod_message(pod: &PodView) -> String {
    match (pod.phase, &pod.waiting) {
        (PodPhase::Pending, Some(why)) => format!("pod {} is pending: {why}", pod.name),
        _ => running_message(&pod.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{t, view};

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_secs(10));
        assert_eq!(b.delay(2), Duration::from_secs(20));
        assert_eq!(b.delay(3), Duration::from_secs(40));
        assert_eq!(b.delay(10), Duration::from_secs(360));
        assert_eq!(b.delay(200), Duration::from_secs(360));
    }

    fn rules(limit: u32, now: i64) -> FoldRules {
        FoldRules {
            backoff_limit: limit,
            backoff: Backoff::default(),
            start_timeout: Duration::from_secs(60),
            suspended: false,
            now: t(now),
        }
    }

    /// Folds segment 1 from `pods` and the status `prev` recorded.
    fn fold_after(pods: &[PodView], prev: Option<&StepStatus>, rules: FoldRules) -> StepState {
        let refs: Vec<&PodView> = pods.iter().collect();
        fold_step(StepId::Segment(1), &refs, prev, &rules)
    }

    fn fold(pods: &[PodView], limit: u32, now: i64) -> StepState {
        fold_after(pods, None, rules(limit, now))
    }

    fn message(s: &StepState) -> &str {
        s.status.message.as_deref().unwrap_or_default()
    }

    #[test]
    fn a_step_without_pods_is_pending() {
        let s = fold(&[], 2, 0);
        assert_eq!(
            (s.phase, s.next_attempt, s.status.attempts),
            (StepPhase::Pending, 1, 0)
        );
    }

    #[test]
    fn a_pending_pod_is_a_running_step_that_says_why_it_waits() {
        let mut pending = view(StepId::Segment(1), 1, PodPhase::Pending);
        pending.waiting = Some("Unschedulable: 0/1 nodes are available".into());
        let s = fold(&[pending], 2, 0);
        assert_eq!(s.phase, StepPhase::Running);
        assert_eq!(
            message(&s),
            "pod trip-seg-1-1 is pending: Unschedulable: 0/1 nodes are available"
        );
    }

    #[test]
    fn a_failed_pod_is_retried_after_backoff_until_the_limit() {
        let p1 = view(StepId::Segment(1), 1, PodPhase::Failed);
        let s = fold(std::slice::from_ref(&p1), 2, 12);
        assert_eq!(s.phase, StepPhase::Retrying);
        assert_eq!(s.next_attempt, 2);
        assert_eq!(s.retry_at, Some(t(20)), "finished at 10 + 10 s");
        assert!(message(&s).contains("retrying in 8s"), "{}", message(&s));

        let p2 = view(StepId::Segment(1), 2, PodPhase::Failed);
        let s = fold(&[p1.clone(), p2.clone()], 2, 12);
        assert_eq!((s.phase, s.retry_at), (StepPhase::Retrying, Some(t(30))));

        let p3 = view(StepId::Segment(1), 3, PodPhase::Failed);
        let s = fold(&[p1, p2, p3], 2, 12);
        assert_eq!(s.phase, StepPhase::Failed);
        assert!(
            message(&s).contains(
                "failed after 3 attempts (pod trip-seg-1-3): exit code 1: keyframe missing"
            ),
            "{}",
            message(&s)
        );
    }

    #[test]
    fn a_pod_that_failed_without_running_is_retried_once_its_backoff_ran_out() {
        // Rejected by the kubelet (e.g. UnexpectedAdmissionError): Failed, no
        // terminated container, so no finish time of its own.
        let mut rejected = view(StepId::Segment(1), 1, PodPhase::Failed);
        rejected.finished = None;
        let first = fold(std::slice::from_ref(&rejected), 2, 12);
        assert_eq!(
            first.retry_at,
            Some(t(22)),
            "first seen failed at 12 + 10 s"
        );
        let later = fold_after(&[rejected], Some(&first.status), rules(2, 25));
        assert_eq!(later.phase, StepPhase::Retrying);
        assert_eq!(later.retry_at, Some(t(22)), "the recorded time holds");
        assert!(
            message(&later).contains("retrying in 0s"),
            "{}",
            message(&later)
        );
    }

    /// backoffLimit used to count the failed pods that still existed: deleting
    /// them gave the attempts back, and the step retried for ever.
    #[test]
    fn deleting_failed_pods_gives_no_attempt_back() {
        let p1 = view(StepId::Segment(1), 1, PodPhase::Failed);
        let p2 = view(StepId::Segment(1), 2, PodPhase::Failed);
        let second = fold(&[p1, p2], 2, 12);
        assert_eq!(second.status.failed_attempts, [1, 2]);
        // Both pods deleted (by hand, or the pod garbage collector).
        let gone = fold_after(&[], Some(&second.status), rules(2, 13));
        assert_eq!(
            (gone.phase, gone.failures, gone.next_attempt),
            (StepPhase::Retrying, 2, 3)
        );
        assert!(
            message(&gone).contains(
                "attempt 2 of 3 failed (pod trip-seg-1-2): exit code 1: keyframe missing"
            ),
            "the reason outlives the pod: {}",
            message(&gone)
        );
        let p3 = view(StepId::Segment(1), 3, PodPhase::Failed);
        let last = fold_after(&[p3], Some(&gone.status), rules(2, 40));
        assert_eq!((last.phase, last.failures), (StepPhase::Failed, 3));
    }

    #[test]
    fn backoff_limit_zero_fails_at_once() {
        let s = fold(&[view(StepId::Segment(1), 1, PodPhase::Failed)], 0, 12);
        assert_eq!(s.phase, StepPhase::Failed);
    }

    #[test]
    fn a_pod_past_its_deadline_fails_the_step_at_once() {
        let mut late = view(StepId::Segment(1), 1, PodPhase::Failed);
        late.permanent = true;
        late.failure = Some(
            "DeadlineExceeded: Pod was active on the node longer than the specified deadline"
                .into(),
        );
        let s = fold(&[late], 2, 12);
        assert_eq!(s.phase, StepPhase::Failed);
        assert!(
            message(&s).starts_with("failed after 1 attempt (pod trip-seg-1-1): DeadlineExceeded")
                && message(&s).ends_with("another attempt cannot help"),
            "{}",
            message(&s)
        );
    }

    #[test]
    fn a_pod_whose_image_cannot_be_pulled_fails_its_attempt_after_the_start_timeout() {
        let mut stuck = view(StepId::Segment(1), 1, PodPhase::Pending);
        stuck.cannot_start = true;
        stuck.waiting = Some("ImagePullBackOff: Back-off pulling image \"nope:1\"".into());
        let early = fold(std::slice::from_ref(&stuck), 2, 30);
        assert_eq!((early.phase, early.failures), (StepPhase::Running, 0));
        assert!(early.delete.is_empty());

        let timed_out = fold(std::slice::from_ref(&stuck), 2, 60);
        assert_eq!(
            (timed_out.phase, timed_out.failures),
            (StepPhase::Retrying, 1)
        );
        assert_eq!(
            timed_out.delete,
            ["trip-seg-1-1"],
            "it holds a GPU for nothing"
        );
        assert!(
            message(&timed_out).contains("its container could not be started: ImagePullBackOff"),
            "{}",
            message(&timed_out)
        );
        // Deleted by the operator: the recorded reason stands, and the step
        // waits for the pod to go.
        stuck.deletion = Some(t(61));
        let deleting = fold_after(&[stuck], Some(&timed_out.status), rules(2, 61));
        assert_eq!(deleting.status.last_failure, timed_out.status.last_failure);
        assert!(deleting.terminating);
    }

    #[test]
    fn an_invalid_image_name_fails_the_step_at_once() {
        let mut invalid = view(StepId::Segment(1), 1, PodPhase::Pending);
        invalid.cannot_start = true;
        invalid.permanent = true;
        invalid.waiting = Some("InvalidImageName".into());
        let s = fold(&[invalid], 2, 1);
        assert_eq!(s.phase, StepPhase::Failed);
        assert_eq!(s.delete, ["trip-seg-1-1"]);
    }

    #[test]
    fn a_retry_in_flight_is_running_and_keeps_the_last_report() {
        let mut p1 = view(StepId::Segment(1), 1, PodPhase::Failed);
        p1.report = Some(kubewan_crds::RunReport {
            peak_rss_bytes: 7,
            ..Default::default()
        });
        let first = fold(std::slice::from_ref(&p1), 2, 12);
        let p2 = view(StepId::Segment(1), 2, PodPhase::Running);
        let s = fold_after(&[p1, p2], Some(&first.status), rules(2, 30));
        assert_eq!((s.phase, s.status.attempts), (StepPhase::Running, 2));
        assert_eq!(s.status.pod.as_deref(), Some("trip-seg-1-2"));
        assert_eq!(s.status.report.unwrap().peak_rss_bytes, 7);
    }

    #[test]
    fn a_pod_deleted_before_it_finished_is_a_failed_attempt_that_blocks_until_gone() {
        let mut p1 = view(StepId::Segment(1), 1, PodPhase::Running);
        p1.deletion = Some(t(20));
        let s = fold(std::slice::from_ref(&p1), 2, 12);
        assert_eq!((s.phase, s.failures), (StepPhase::Retrying, 1));
        assert!(s.terminating, "no second pod while the first still runs");
        assert!(
            message(&s).contains("deleted before it finished"),
            "{}",
            message(&s)
        );
        // Its node never confirms: past the grace period and LOST_AFTER it no
        // longer holds the step.
        let lost = fold_after(&[p1], Some(&s.status), rules(2, 20 + 61));
        assert!(!lost.terminating);
        assert_eq!((lost.phase, lost.next_attempt), (StepPhase::Retrying, 2));
    }

    #[test]
    fn a_pod_stopped_by_a_suspend_is_no_failure_and_its_name_is_not_reused() {
        let running = view(StepId::Segment(1), 1, PodPhase::Running);
        let before = fold(std::slice::from_ref(&running), 2, 5);
        let mut stopping = running.clone();
        stopping.deletion = Some(t(40));
        let suspended = FoldRules {
            suspended: true,
            ..rules(2, 12)
        };
        let s = fold_after(&[stopping], Some(&before.status), suspended);
        assert_eq!((s.phase, s.failures), (StepPhase::Running, 0));
        assert!(s.terminating);
        let gone = fold_after(&[], Some(&s.status), suspended);
        let resumed = fold_after(&[], Some(&gone.status), rules(2, 100));
        assert_eq!(
            (resumed.phase, resumed.failures, resumed.next_attempt),
            (StepPhase::Pending, 0, 2)
        );
    }

    #[test]
    fn a_created_pod_the_cache_does_not_show_yet_is_running_then_taken_for_removed() {
        let mut created = fold(&[], 2, 0);
        created.start("trip-seg-1-1", t(0));
        let created = created.status;
        let soon = fold_after(&[], Some(&created), rules(2, 5));
        assert_eq!(
            (soon.phase, soon.next_attempt),
            (StepPhase::Running, 2),
            "no second pod for the attempt"
        );
        let later = fold_after(&[], Some(&created), rules(2, 31));
        assert_eq!((later.phase, later.failures), (StepPhase::Retrying, 1));
        assert!(
            message(&later).contains("removed before it finished"),
            "{}",
            message(&later)
        );
    }

    #[test]
    fn refused_creations_are_carried_until_a_pod_of_the_step_is_created() {
        let refused_twice = StepStatus {
            create_refusals: 2,
            ..Default::default()
        };
        let pending = fold_after(&[], Some(&refused_twice), rules(2, 0));
        assert_eq!(
            (pending.phase, pending.status.create_refusals),
            (StepPhase::Pending, 2)
        );
        // A retry's creation refused twice, the failed attempt's pod still there.
        let retry_refused = StepStatus {
            attempts: 1,
            failed_attempts: vec![1],
            last_failure: Some("exit code 1: keyframe missing".into()),
            ..refused_twice.clone()
        };
        let failed = view(StepId::Segment(1), 1, PodPhase::Failed);
        let retrying = fold_after(&[failed], Some(&retry_refused), rules(2, 30));
        assert_eq!(
            (retrying.phase, retrying.status.create_refusals),
            (StepPhase::Retrying, 2)
        );
        // Created, then written as such: none refused since.
        let mut started = pending;
        started.start("trip-seg-1-1", t(40));
        assert_eq!(started.status.create_refusals, 0);
        // Created, but the status that said so was never written: the pod shows.
        let running = view(StepId::Segment(1), 1, PodPhase::Running);
        let shown = fold_after(&[running], Some(&refused_twice), rules(2, 41));
        assert_eq!(
            (shown.phase, shown.status.create_refusals),
            (StepPhase::Running, 0)
        );
    }

    #[test]
    fn a_recorded_success_survives_its_pod() {
        let prev = StepStatus {
            phase: StepPhase::Succeeded,
            attempts: 1,
            ..Default::default()
        };
        let s = fold_after(&[], Some(&prev), rules(2, 0));
        assert_eq!(s.phase, StepPhase::Succeeded);
    }
}
