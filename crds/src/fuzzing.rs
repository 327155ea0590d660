//! What the fuzz targets (`fuzz/fuzz_targets/`) feed the API crate: a
//! TravelJob as the API server or a job file hands it over, and a runner's
//! termination message as the operator reads it. The fuzzer and the stable
//! replay of its kept corpus (`runner/tests/fuzz_corpus.rs`) run the same
//! code. An entry point takes arbitrary bytes and must return without a
//! panic; where the rest of the system relies on a property of what it
//! derives (names Kubernetes accepts, a plan the runner accepts, a task that
//! fits its environment variable), it asserts it, so a broken one is a finding.

use std::collections::BTreeSet;

use kube::ResourceExt;

use crate::limits::{MAX_NAME_BYTES, MAX_TASK_BYTES};
use crate::manifest::parse_job;
use crate::plan::Plan;
use crate::report::{RunReport, shorten};
use crate::task::Task;
use crate::validate::{check_dns_name, check_relative_path, validate_job, validate_plan};
use crate::{StepAttempt, TravelJob};

/// A TravelJob as the operator gets it from the API server (JSON), and as
/// local mode reads a job file (YAML under the cluster's rules). A job that
/// passes validation is planned, and everything the operator derives from it
/// is checked ([`check_valid_job`]).
pub fn traveljob_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(job) = serde_json::from_str::<TravelJob>(text)
        && validate_job(&job).is_ok()
    {
        check_valid_job(&job);
    }
    if let Ok(job) = parse_job(text, "fuzz-input") {
        check_valid_job(&job);
    }
}

/// What holds for every valid job: its plan has one segment per pair of
/// keyframes and passes the runner's own check, its stage graph runs to the
/// end, and each of its pods has a name, labels and task that Kubernetes and
/// the runner accept.
fn check_valid_job(job: &TravelJob) {
    let plan = Plan::validated(&job.spec).expect("a valid job's spec is valid");
    assert_eq!(plan.segments.len(), job.spec.keyframes.len() - 1);
    let frames: u32 = plan
        .segments
        .iter()
        .map(|s| s.frames - s.overlap_before)
        .sum();
    assert_eq!(plan.total_frames, frames);
    if let Err(e) = validate_plan(&plan) {
        panic!("the runner refuses a valid job's plan: {e}");
    }
    check_relative_path(&job.output_dir()).expect("the output folder stays in its volume");
    check_graph(&plan);
    let name = job.name_any();
    let last_attempt = job.spec.backoff_limit + 1;
    for step in plan.steps() {
        for attempt in [step.attempt(1), step.attempt(last_attempt)] {
            check_pod(&name, attempt);
        }
        let task = serde_json::to_string(&Task::new(job, &plan, step)).unwrap();
        assert!(
            task.len() <= MAX_TASK_BYTES,
            "a task of {} bytes",
            task.len()
        );
        let task: Task = serde_json::from_str(&task).expect("the runner reads its task");
        assert_eq!(task.step, step);
        if let Err(e) = validate_plan(&task.plan) {
            panic!("the runner refuses the plan of its task: {e}");
        }
    }
}

/// The stage graph, walked as the operator does (starting every ready step,
/// each finishing before the next round), finishes every step; dependencies
/// come before their dependants, and no round runs more segments than the
/// job's parallelism.
fn check_graph(plan: &Plan) {
    let steps = plan.steps();
    for (at, step) in steps.iter().enumerate() {
        for dependency in plan.dependencies(*step) {
            let before = steps.iter().position(|s| *s == dependency);
            assert!(before.is_some_and(|b| b < at), "{step} needs {dependency}");
        }
    }
    let mut done = BTreeSet::new();
    for _ in 0..steps.len() {
        let ready = plan.ready_steps(&done, &BTreeSet::new());
        let segments = ready.iter().filter(|s| s.segment().is_some()).count();
        assert!(segments <= plan.parallelism as usize);
        done.extend(ready);
    }
    assert_eq!(done.len(), steps.len(), "steps never ready");
}

/// Kubernetes accepts the pod of `attempt` in job `job_name`: its name is a
/// DNS subdomain, its labels are label values; the labels read back.
fn check_pod(job_name: &str, attempt: StepAttempt) {
    let pod = attempt.pod_name(job_name);
    if let Err(why) = check_dns_name(&pod, MAX_NAME_BYTES, true) {
        panic!("pod name {pod:?} {why}");
    }
    let labels = attempt.labels(job_name);
    for (key, value) in &labels {
        assert!(is_label_value(value), "label {key}={value:?}");
    }
    assert_eq!(StepAttempt::from_labels(&labels), Some(attempt));
}

/// A Kubernetes label value: at most 63 characters, alphanumerics, '-', '_'
/// and '.', starting and ending with an alphanumeric (or empty).
fn is_label_value(value: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    value.is_empty()
        || (value.len() <= 63
            && value.starts_with(alnum)
            && value.ends_with(alnum)
            && value
                .chars()
                .all(|c| alnum(c) || matches!(c, '-' | '_' | '.')))
}

/// A pod's termination message as the operator reads it. A report read back
/// writes a message that reads back with the figures the operator folds,
/// and messages are shortened within their bounds.
pub fn run_report(data: &[u8]) {
    let message = String::from_utf8_lossy(data);
    let Some(report) = RunReport::from_termination_message(&message) else {
        return;
    };
    let written = report.to_termination_message();
    let back =
        RunReport::from_termination_message(&written).expect("a report's message reads back");
    assert_eq!((back.step, back.ok), (report.step, report.ok));
    assert_eq!(back.peak_rss_bytes, report.peak_rss_bytes);
    assert_eq!(back.output, report.output);
    if let Some(text) = &report.message {
        for max in [3, 60, 600] {
            assert!(shorten(text, max).len() <= max);
        }
    }
}
