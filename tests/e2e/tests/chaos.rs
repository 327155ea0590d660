//! The operator crashing again and again while a long job runs: every crash
//! is a SIGKILL of the leader's process (no shutdown, no Lease release) at a
//! random moment, and the job must still finish with nothing lost and no
//! step run twice.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::{Api, ResourceExt};
use kubewan_crds::status::StepPhase;
use kubewan_crds::{Plan, StepAttempt, TravelJob};
use kubewan_e2e::*;

/// Crashes during the job.
const CRASHES: usize = 10;

/// A preview job of 31 chained segments (the most keyframes a job may have:
/// the example's, again and again): 32 steps one after the other, long
/// enough for every crash to land while it runs (about two steps finish
/// between two crashes).
fn long_job() -> TravelJob {
    let mut job = preview_job("long");
    let keyframes = job.spec.keyframes.clone();
    job.spec.keyframes = keyframes
        .iter()
        .cycle()
        .take(kubewan_crds::limits::MAX_KEYFRAMES)
        .cloned()
        .collect();
    job.spec.prompts = Vec::new();
    job
}

/// A pseudo-random pause of 0.3 to 2 s (the clock's nanoseconds as the seed:
/// every run crashes the operator at other moments).
fn random_pause(round: usize) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mixed = (nanos ^ (round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % 1700;
    Duration::from_millis(300 + mixed)
}

/// Each pod name (one per step attempt) and every uid it had: a second uid
/// for one name is a pod deleted and made again.
async fn record_pods(client: &kube::Client, ns: &str, seen: &mut BTreeMap<String, Vec<String>>) {
    for pod in job_pods(client, ns, "long").await.unwrap() {
        let uids = seen.entry(pod.name_any()).or_default();
        let uid = pod.uid().unwrap_or_default();
        if !uids.contains(&uid) {
            uids.push(uid);
        }
    }
}

#[tokio::test]
async fn ten_operator_crashes_mid_job_lose_nothing_and_run_no_step_twice() {
    let client = client().await;
    let ns = "e2e-chaos";
    fresh_namespace(&client, ns).await.unwrap();
    let job = long_job();
    let plan = Plan::from_spec(&job.spec);
    create_job(&client, ns, &job).await.unwrap();

    let jobs: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    let mut seen = BTreeMap::new();
    for round in 0..CRASHES {
        tokio::time::sleep(random_pause(round)).await;
        record_pods(&client, ns, &mut seen).await;
        let now = jobs.get("long").await.unwrap();
        let status = now.status.clone().unwrap_or_default();
        assert!(
            !status.phase.is_finished(),
            "the job finished after {round} crashes: make it longer ({status:?})"
        );
        println!(
            "crash {}: {} at {:?} ({})",
            round + 1,
            operator(&["crash"]).unwrap().trim(),
            status.phase,
            status.progress.unwrap_or_default()
        );
    }

    let done = wait_succeeded(&client, ns, "long", Duration::from_secs(600)).await;
    record_pods(&client, ns, &mut seen).await;
    let status = done.status.unwrap();

    // No step ran twice: one pod per step, attempt 1, never made again.
    let steps = plan.steps();
    assert_eq!(seen.len(), steps.len(), "one pod per step: {seen:?}");
    for (name, uids) in &seen {
        assert_eq!(uids.len(), 1, "{name} was deleted and made again");
    }
    for pod in job_pods(&client, ns, "long").await.unwrap() {
        let run = StepAttempt::from_labels(pod.labels()).unwrap();
        assert_eq!(run.attempt, 1, "{}", pod.name_any());
    }
    // Status lost nothing: every step succeeded once, with its report and output.
    for step in steps {
        let s = status.step(step).unwrap();
        assert_eq!((s.phase, s.attempts), (StepPhase::Succeeded, 1), "{step}");
        assert!(s.failed_attempts.is_empty(), "{step}: {s:?}");
        assert!(s.report.is_some(), "{step} has its report");
    }
    assert!(status.segments.iter().all(|s| s.output.is_some()));
    let output = status.output.expect("the final video");
    let frames = check_mp4(&output_root().join(&output)).unwrap();
    assert_eq!(frames, Some(plan.total_frames as u64), "{output}");
}
