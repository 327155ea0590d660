//! Pure: what one reconcile does. From the job, the pods that exist and the
//! clock, it decides the status to write, the pods to create and delete, the
//! events to emit, and when to look again. The controller only carries it out.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kubewan_crds::status::{JobPhase, StepPhase, TravelJobStatus};
use kubewan_crds::validate::validate;
use kubewan_crds::{Plan, StepId, TravelJob};

use crate::pods::output_dir;
use crate::status::{
    Backoff, PodPhase, PodView, REASON_INVALID, StepState, failed_reason, fold_step, running_phase,
    set_conditions, step_name,
};

/// Operator settings that shape decisions.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub backoff: Backoff,
    /// How often an active job is looked at even without any event.
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            backoff: Backoff::default(),
            resync: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: String,
    pub action: String,
    pub note: String,
    /// The pod the event is about, if any (the event's `related` object; it
    /// also keeps events about different pods from being merged into one series).
    pub pod: Option<String>,
}

impl EventSpec {
    fn normal(reason: &str, note: String) -> Self {
        EventSpec {
            warning: false,
            reason: reason.into(),
            action: "Reconcile".into(),
            note,
            pod: None,
        }
    }
    fn about(mut self, pod: Option<String>) -> Self {
        self.pod = pod;
        self
    }
    fn warning(reason: &str, note: String) -> Self {
        EventSpec {
            warning: true,
            reason: reason.into(),
            action: "Reconcile".into(),
            note,
            pod: None,
        }
    }
}

/// Everything one reconcile does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub status: TravelJobStatus,
    /// Pods to create: (step, attempt).
    pub create: Vec<(StepId, u32)>,
    /// Pods to delete, by name.
    pub delete: Vec<String>,
    pub events: Vec<EventSpec>,
    /// Delete the TravelJob itself (ttlSecondsAfterFinished elapsed).
    pub delete_job: bool,
    pub requeue: Option<Duration>,
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let secs = at.duration_since(now).as_secs_f64();
    Duration::from_secs_f64(secs.max(0.0)).max(Duration::from_millis(200))
}

/// Decides one reconcile of `job`, given its pods (any pods labelled for it).
pub fn decide(job: &TravelJob, pods: &[PodView], settings: &Settings, now: Timestamp) -> Decision {
    let prev = job.status.clone().unwrap_or_default();
    let generation = job.metadata.generation;
    let mut status = prev.clone();
    status.observed_generation = generation;
    let mut d = Decision::default();
    let active_pods = || {
        pods.iter()
            .filter(|p| !p.terminating && !p.phase.is_finished())
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
    };

    // A finished job stays finished (unless it failed validation and the spec
    // changed since): only its TTL and stray pods are handled.
    let invalid_before = failed_reason(&prev) == Some(REASON_INVALID);
    if prev.phase.is_finished() && !invalid_before {
        d.delete = active_pods();
        finish_ttl(job, &prev, now, &mut d);
        d.status = prev;
        d.status.observed_generation = generation;
        return d;
    }

    // The v1.20 test API server ignores CEL rules, and older ones too: validate here.
    if let Err(errors) = validate(&job.spec) {
        status.phase = JobPhase::Failed;
        status.message = Some(errors.to_string());
        status.completion_time = prev.completion_time.clone().or(Some(Time(now)));
        set_conditions(&mut status, REASON_INVALID, generation, now);
        if !(invalid_before && prev.message == status.message) {
            d.events
                .push(EventSpec::warning(REASON_INVALID, errors.to_string()));
        }
        d.delete = active_pods();
        d.status = status;
        finish_ttl(job, &d.status.clone(), now, &mut d);
        return d;
    }
    if invalid_before {
        // The spec was fixed: start over.
        status.completion_time = None;
        status.message = None;
    }

    let plan = Plan::from_spec(&job.spec);
    let out_dir = output_dir(job);
    let limit = job.spec.backoff_limit;
    let prev_step = |step: StepId| match step {
        StepId::Prompts => prev.prompts.clone(),
        StepId::Segment(i) => prev
            .segments
            .iter()
            .find(|s| s.index == i)
            .map(|s| s.step.clone()),
        StepId::Stitch => prev.stitch.clone(),
    };
    let mut steps: Vec<StepState> = plan
        .steps()
        .into_iter()
        .map(|step| {
            let mine: Vec<&PodView> = pods.iter().filter(|p| p.step == step).collect();
            fold_step(
                step,
                &mine,
                prev_step(step).as_ref(),
                limit,
                settings.backoff,
                now,
            )
        })
        .collect();
    status.video_model = Some(plan.video_model_label());

    let failed = steps.iter().find(|s| s.phase == StepPhase::Failed).cloned();
    let succeeded = steps
        .iter()
        .any(|s| s.step == StepId::Stitch && s.phase == StepPhase::Succeeded);
    let mut reason = String::new();

    if let Some(failed) = failed {
        // Out of retries: the job fails, nothing downstream starts, and what is
        // still running is stopped.
        let blocked: Vec<String> = steps
            .iter()
            .filter(|s| s.phase == StepPhase::Pending)
            .map(|s| step_name(s.step))
            .collect();
        status.phase = JobPhase::Failed;
        status.message = Some(format!(
            "{} {}{}",
            step_name(failed.step),
            failed.status.message.clone().unwrap_or_default(),
            if blocked.is_empty() {
                String::new()
            } else {
                format!("; not started: {}", blocked.join(", "))
            }
        ));
        reason = "BackoffLimitExceeded".into();
        status.completion_time = prev.completion_time.clone().or(Some(Time(now)));
        d.delete = active_pods();
    } else if succeeded {
        status.phase = JobPhase::Succeeded;
        let stitch = steps.iter().find(|s| s.step == StepId::Stitch);
        status.completion_time = prev
            .completion_time
            .clone()
            .or_else(|| stitch.and_then(|s| s.status.finish_time.clone()))
            .or(Some(Time(now)));
        reason = "Completed".into();
    } else if job.spec.suspend {
        status.phase = JobPhase::Suspended;
        status.message = Some("suspended: no new pods start and running ones are stopped".into());
        d.delete = active_pods();
    } else {
        // Start what is ready.
        let done: BTreeSet<StepId> = steps
            .iter()
            .filter(|s| s.phase == StepPhase::Succeeded)
            .map(|s| s.step)
            .collect();
        let busy: BTreeSet<StepId> = steps
            .iter()
            .filter(|s| {
                matches!(s.phase, StepPhase::Running | StepPhase::Retrying) || s.terminating
            })
            .map(|s| s.step)
            .collect();
        for step in plan.ready_steps(&done, &busy) {
            if let Some(s) = steps.iter_mut().find(|s| s.step == step) {
                d.create.push((step, s.next_attempt));
                mark_started(s, &job_name(job), now);
            }
        }
        for s in steps
            .iter_mut()
            .filter(|s| s.phase == StepPhase::Retrying && !s.terminating)
        {
            match s.retry_at {
                Some(at) if at > now => {
                    let wait = until(now, at);
                    d.requeue = Some(d.requeue.map_or(wait, |r: Duration| r.min(wait)));
                }
                _ => {
                    d.create.push((s.step, s.next_attempt));
                    mark_started(s, &job_name(job), now);
                }
            }
        }
        status.phase = running_phase(&steps);
        status.message = Some(progress_message(&steps));
        if status.start_time.is_none() {
            status.start_time = Some(Time(now));
        }
        status.completion_time = None;
    }

    let step_statuses = steps.iter().map(|s| (s.step, s.status.clone())).collect();
    status.fold_steps(&plan, &step_statuses, &out_dir);
    if status.phase == JobPhase::Succeeded {
        status.message = Some(match &status.output {
            Some(out) => format!(
                "wrote {out} ({} frames at {} fps){}",
                plan.total_frames,
                plan.fps,
                if plan.is_preview() {
                    ", preview model"
                } else {
                    ""
                }
            ),
            None => "succeeded".into(),
        });
    }
    set_conditions(&mut status, &reason, generation, now);
    d.events.extend(transitions(&prev, &status, &steps));
    if status.phase.is_finished() {
        finish_ttl(job, &status, now, &mut d);
    } else if status.phase != JobPhase::Suspended {
        d.requeue = Some(
            d.requeue
                .map_or(settings.resync, |r| r.min(settings.resync)),
        );
    }
    d.status = status;
    d
}

fn job_name(job: &TravelJob) -> String {
    job.metadata.name.clone().unwrap_or_default()
}

/// A step whose pod is being created this reconcile shows as running at once.
fn mark_started(s: &mut StepState, job: &str, now: Timestamp) {
    let name = crate::pods::pod_name(job, s.step, s.next_attempt);
    s.phase = StepPhase::Running;
    s.status.phase = StepPhase::Running;
    s.status.attempts = s.next_attempt;
    s.status.start_time = Some(Time(now));
    s.status.finish_time = None;
    s.status.message = Some(format!("created pod {name}"));
    s.status.pod = Some(name);
}

fn progress_message(steps: &[StepState]) -> String {
    let active: Vec<String> = steps
        .iter()
        .filter(|s| matches!(s.phase, StepPhase::Running | StepPhase::Retrying))
        .map(|s| {
            format!(
                "{}: {}",
                step_name(s.step),
                s.status.message.clone().unwrap_or_default()
            )
        })
        .collect();
    if active.is_empty() {
        "waiting".into()
    } else {
        active.join("; ")
    }
}

/// TTL after finishing: delete the job when it elapsed, else look again then.
fn finish_ttl(job: &TravelJob, status: &TravelJobStatus, now: Timestamp, d: &mut Decision) {
    let (Some(ttl), Some(done)) = (job.spec.ttl_seconds_after_finished, &status.completion_time)
    else {
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

/// Events for what changed between the previous status and the new one.
fn transitions(
    prev: &TravelJobStatus,
    new: &TravelJobStatus,
    steps: &[StepState],
) -> Vec<EventSpec> {
    let mut events = Vec::new();
    let prev_step = |step: StepId| match step {
        StepId::Prompts => prev.prompts.as_ref(),
        StepId::Segment(i) => prev.segments.iter().find(|s| s.index == i).map(|s| &s.step),
        StepId::Stitch => prev.stitch.as_ref(),
    };
    for s in steps {
        let before = prev_step(s.step);
        let changed = before.map(|b| (b.phase, b.attempts)) != Some((s.phase, s.status.attempts));
        if !changed {
            continue;
        }
        let msg = s.status.message.clone().unwrap_or_default();
        match s.phase {
            StepPhase::Retrying => events.push(
                EventSpec::warning("BackOff", format!("{} {msg}", step_name(s.step)))
                    .about(s.status.pod.clone()),
            ),
            StepPhase::Failed => events.push(
                EventSpec::warning("StepFailed", format!("{} {msg}", step_name(s.step)))
                    .about(s.status.pod.clone()),
            ),
            StepPhase::Succeeded if before.map(|b| b.phase) != Some(StepPhase::Succeeded) => events
                .push(
                    EventSpec::normal(
                        "StepSucceeded",
                        format!(
                            "{} succeeded (pod {})",
                            step_name(s.step),
                            s.status.pod.clone().unwrap_or_default()
                        ),
                    )
                    .about(s.status.pod.clone()),
                ),
            _ => {}
        }
    }
    if prev.phase != new.phase {
        let note = new.message.clone().unwrap_or_default();
        events.push(match new.phase {
            JobPhase::Failed => EventSpec::warning("Failed", note),
            JobPhase::Succeeded => EventSpec::normal("Succeeded", note),
            JobPhase::Suspended => EventSpec::normal("Suspended", note),
            _ if prev.phase == JobPhase::Suspended => {
                EventSpec::normal("Resumed", format!("resumed: {note}"))
            }
            phase => EventSpec::normal(&format!("{phase:?}"), note),
        });
    }
    events
}

/// True when a pod of this job is still running (used by tests and metrics).
pub fn has_active_pods(pods: &[PodView]) -> bool {
    pods.iter()
        .any(|p| !p.phase.is_finished() && !p.terminating && p.phase != PodPhase::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::tests::{SPEC, job};
    use crate::status::tests::{t, view};

    fn settings() -> Settings {
        Settings::default()
    }

    /// Runs a decision and stores its status into the job, as the API would.
    fn step(job: &mut TravelJob, pods: &[PodView], now: i64) -> Decision {
        let d = decide(job, pods, &settings(), t(now));
        job.status = Some(d.status.clone());
        d
    }

    const NO_VLM: &str = "enhancePrompt: {enabled: false}\n";

    #[test]
    fn a_new_job_starts_its_first_segment() {
        let mut j = job(&format!("{SPEC}{NO_VLM}"));
        let d = step(&mut j, &[], 0);
        assert_eq!(d.create, vec![(StepId::Segment(0), 1)]);
        assert_eq!(d.status.phase, JobPhase::Generating);
        assert_eq!(d.status.video_model.as_deref(), Some("preview (preview)"));
        assert_eq!(
            d.status.segments[0].step.pod.as_deref(),
            Some("trip-seg-0-1")
        );
        assert_eq!(d.status.progress.as_deref(), Some("0/2"));
        assert_eq!(d.status.observed_generation, Some(3));
        assert!(d.events.iter().any(|e| e.reason == "Generating"));
        assert!(d.requeue.is_some());
    }

    #[test]
    fn with_the_vlm_prompts_come_first() {
        let mut j = job(SPEC);
        let d = step(&mut j, &[], 0);
        assert_eq!(d.create, vec![(StepId::Prompts, 1)]);
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
            step(&mut j, &pods, 11).create,
            vec![(StepId::Segment(1), 1)]
        );
        pods.push(view(StepId::Segment(1), 1, PodPhase::Succeeded));
        assert_eq!(step(&mut j, &pods, 12).create, vec![(StepId::Stitch, 1)]);
        assert_eq!(j.status.as_ref().unwrap().phase, JobPhase::Stitching);
        pods.push(view(StepId::Stitch, 1, PodPhase::Succeeded));
        let d = step(&mut j, &pods, 13);
        assert!(d.create.is_empty());
        let s = &d.status;
        assert_eq!(s.phase, JobPhase::Succeeded);
        assert_eq!(s.output.as_deref(), Some("videos/studio/trip/stitch.mp4"));
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
        assert_eq!(d.create, vec![(StepId::Segment(0), 2)]);
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
            .find(|c| c.type_ == "Failed")
            .unwrap();
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "BackoffLimitExceeded")
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
        assert!(d.events.iter().any(|e| e.reason == "InvalidSpec"));
        // The same invalid spec again: no new event.
        assert!(step(&mut j, &[], 1).events.is_empty());
        // Fixed: it starts.
        j.spec.keyframes = vec!["a.png".into(), "b.png".into()];
        let d = step(&mut j, &[], 2);
        assert_eq!(d.create, vec![(StepId::Segment(0), 1)]);
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
        pods[1].terminating = true;
        assert!(step(&mut j, &pods, 13).create.is_empty());
        pods.pop(); // gone
        j.spec.suspend = false;
        let d = step(&mut j, &pods, 14);
        assert_eq!(
            d.create,
            vec![(StepId::Segment(1), 1)],
            "segment 0 is not redone"
        );
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
        assert_eq!(d.create, vec![(StepId::Segment(0), 1)]);
        let pods = [view(StepId::Segment(0), 1, PodPhase::Failed)];
        let d = step(&mut j, &pods, 11);
        assert!(d.create.is_empty(), "{:?}", d.create);
    }
}
