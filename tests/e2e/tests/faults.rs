//! Faults injected through the test node and the API server, each checked end
//! to end: an image the kubelet cannot pull (retried, then failed naming the
//! pull error), an image that may never be pulled (failed at once), failed
//! pods deleted under the operator (the retry budget holds), and a pod
//! evicted before it ran (a failed attempt, retried).

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, EvictParams};
use kubewan_crds::status::{JobPhase, StepPhase, TravelJobStatus};
use kubewan_crds::{StepId, TravelJob};
use kubewan_e2e::*;

/// A preview job `name` (no VLM): segment 0, segment 1, then the stitch.
fn preview_job(name: &str) -> TravelJob {
    let mut job = example();
    job.metadata.name = Some(name.into());
    job.spec.enhance_prompt.enabled = false;
    job.spec.model.name = kubewan_crds::PREVIEW_MODEL.into();
    job
}

/// Runs `job` in a fresh namespace `ns` until it finished, asserts it failed,
/// and returns its status and message.
async fn run_to_failure(
    client: &kube::Client,
    ns: &str,
    job: &TravelJob,
) -> (TravelJobStatus, String) {
    fresh_namespace(client, ns).await.unwrap();
    create_job(client, ns, job).await.unwrap();
    let done = wait_finished(client, ns, &job.name_any(), Duration::from_secs(300))
        .await
        .unwrap();
    let status = done.status.unwrap();
    let message = status.message.clone().unwrap_or_default();
    println!("message: {message}");
    assert_eq!(status.phase, JobPhase::Failed, "{message}");
    (status, message)
}

async fn pod_names(client: &kube::Client, ns: &str, job: &str) -> BTreeSet<String> {
    job_pods(client, ns, job)
        .await
        .unwrap()
        .iter()
        .map(|p| p.name_any())
        .collect()
}

/// The registry at 127.0.0.1:9 refuses every connection (tests/e2e/values.yaml
/// allows its images): each attempt fails after the operator's start timeout
/// (15 s here), its pod is deleted, and the job fails naming the pull error.
#[tokio::test]
async fn an_image_the_kubelet_cannot_pull_is_retried_then_fails_the_job_naming_the_pull_error() {
    let client = client().await;
    let mut job = preview_job("unpullable");
    job.spec.runner.image = Some("127.0.0.1:9/kubewan/kubewan-runner:missing".into());
    job.spec.runner.image_pull_policy = Some("Always".into());
    job.spec.backoff_limit = 1;
    let ns = "e2e-pull";
    let (status, message) = run_to_failure(&client, ns, &job).await;
    assert!(
        message.starts_with("segment 0 failed after 2 attempts (pod unpullable-seg-0-2): its container could not be started: ")
            && (message.contains("ErrImagePull") || message.contains("ImagePullBackOff")),
        "{message}"
    );
    assert!(
        message.contains("not started: segment 1, stitch"),
        "{message}"
    );
    let segment = status.step(StepId::Segment(0)).unwrap();
    assert_eq!(segment.failed_attempts, [1, 2]);
    // Both pods were deleted: a pod that cannot start holds its GPU for nothing.
    wait_until(
        Duration::from_secs(60),
        "the pods to be deleted",
        || async { Ok(job_pods(&client, ns, "unpullable").await?.is_empty()) },
    )
    .await
    .unwrap();
}

/// imagePullPolicy Never with an image the node does not have: no attempt
/// can help, so the job fails at once, on its first attempt.
#[tokio::test]
async fn an_image_that_may_never_be_pulled_fails_the_job_at_once() {
    let client = client().await;
    let mut job = preview_job("never");
    job.spec.runner.image = Some("127.0.0.1:9/kubewan/kubewan-runner:not-on-this-node".into());
    job.spec.runner.image_pull_policy = Some("Never".into());
    job.spec.backoff_limit = 3;
    let (_, message) = run_to_failure(&client, "e2e-never-pull", &job).await;
    assert!(
        message.starts_with("segment 0 failed after 1 attempt (pod never-seg-0-1): its container could not be started: ErrImageNeverPull")
            && message.contains("another attempt cannot help"),
        "{message}"
    );
}

/// The retry budget is kept in status: failed pods deleted as soon as they
/// fail (by hand, or by the pod garbage collector) give no attempt back.
#[tokio::test]
async fn failed_pods_deleted_under_the_operator_give_no_attempt_back() {
    let client = client().await;
    let ns = "e2e-deleted-failures";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = preview_job("forgetful");
    job.spec.keyframes[1] = "keyframes/does-not-exist.png".into();
    job.spec.backoff_limit = 2;
    create_job(&client, ns, &job).await.unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let jobs: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    let mut deleted = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        for pod in job_pods(&client, ns, "forgetful").await.unwrap() {
            let failed = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed");
            if failed && deleted.insert(pod.name_any()) {
                pods.delete(&pod.name_any(), &DeleteParams::default())
                    .await
                    .unwrap();
            }
        }
        let job = jobs.get("forgetful").await.unwrap();
        if job.status.as_ref().is_some_and(|s| s.phase.is_finished()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after 300 s (deleted {deleted:?}): {:?}",
            job.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = wait_finished(&client, ns, "forgetful", Duration::from_secs(10))
        .await
        .unwrap()
        .status
        .unwrap();
    let message = status.message.clone().unwrap_or_default();
    println!("deleted {deleted:?}; message: {message}");
    assert_eq!(status.phase, JobPhase::Failed, "{message}");
    assert!(
        message.starts_with("segment 0 failed after 3 attempts"),
        "{message}"
    );
    let segment = status.step(StepId::Segment(0)).unwrap();
    assert_eq!(segment.failed_attempts, [1, 2, 3]);
    assert!(
        segment
            .last_failure
            .as_deref()
            .is_some_and(|f| f.contains("does-not-exist.png")),
        "{segment:?}"
    );
}

/// A pod evicted through the eviction API before it ran (it waits for a
/// second GPU the node does not have) is a failed attempt: the step says so
/// and tries again under a new pod.
#[tokio::test]
async fn an_evicted_pod_is_a_failed_attempt_and_is_retried() {
    let client = client().await;
    let ns = "e2e-evicted";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = preview_job("evicted");
    job.spec.runner.gpus = 2;
    job.spec.backoff_limit = 2;
    create_job(&client, ns, &job).await.unwrap();

    wait_until(Duration::from_secs(60), "the first pod", || async {
        Ok(pod_names(&client, ns, "evicted")
            .await
            .contains("evicted-seg-0-1"))
    })
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.evict("evicted-seg-0-1", &EvictParams::default())
        .await
        .unwrap();

    let retried = wait_job(
        &client,
        ns,
        "evicted",
        Duration::from_secs(120),
        "segment 0's second attempt",
        |j| {
            j.status
                .as_ref()
                .and_then(|s| s.step(StepId::Segment(0)))
                .is_some_and(|s| s.attempts == 2)
        },
    )
    .await
    .unwrap();
    let segment = retried
        .status
        .as_ref()
        .unwrap()
        .step(StepId::Segment(0))
        .unwrap();
    println!("segment 0: {segment:?}");
    assert_eq!(segment.failed_attempts, [1]);
    assert_eq!(segment.phase, StepPhase::Running);
    let why = segment.last_failure.as_deref().unwrap_or_default();
    assert!(
        why.contains("before it finished"),
        "the eviction is named: {why}"
    );
    assert!(
        pod_names(&client, ns, "evicted")
            .await
            .contains("evicted-seg-0-2")
    );
    // Its pods would wait for a second GPU for ever.
    let jobs: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    jobs.delete("evicted", &DeleteParams::default())
        .await
        .unwrap();
}
