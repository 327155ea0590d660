//! Faults injected through the test node and the API server, each checked end
//! to end: an image the kubelet cannot pull (retried, then failed naming the
//! pull error), an image that may never be pulled (failed at once), failed
//! pods deleted under the operator (the retry budget holds), a pod evicted
//! before it ran (a failed attempt, retried), a pod the kubelet refuses to
//! admit (retried), a node lost under a pod (given up after the grace period,
//! retried), a pod past its deadline (failed at once) and one killed for its
//! memory limit (retried, then failed naming the OOM kill).

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, PostParams};
use kubewan_crds::spec::ComputeDevice;
use kubewan_crds::status::{JobPhase, StepPhase, StepStatus};
use kubewan_crds::{StepId, TravelJob};
use kubewan_e2e::*;

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

/// A pod evicted through the eviction API before it ran (it waits for more
/// GPUs than the node has) is a failed attempt: the step says so and tries
/// again under a new pod.
#[tokio::test]
async fn an_evicted_pod_is_a_failed_attempt_and_is_retried() {
    let client = client().await;
    let ns = "e2e-evicted";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = preview_job("evicted");
    job.spec.runner.device = ComputeDevice::Gpu;
    job.spec.runner.gpus = 64;
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

    let segment = second_attempt(&client, ns, "evicted", Duration::from_secs(120)).await;
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

/// Segment 0's status once its second attempt started.
async fn second_attempt(
    client: &kube::Client,
    ns: &str,
    job: &str,
    timeout: Duration,
) -> StepStatus {
    let segment_0 = |j: &TravelJob| {
        j.status
            .as_ref()
            .and_then(|s| s.step(StepId::Segment(0)))
            .cloned()
    };
    let retried = wait_job(
        client,
        ns,
        job,
        timeout,
        "segment 0's second attempt",
        |j| segment_0(j).is_some_and(|s| s.attempts == 2),
    )
    .await
    .unwrap();
    segment_0(&retried).unwrap()
}

/// Waits until `job` succeeded; asserts that segment 0 took two attempts, the
/// first failed, and returns segment 0's status.
async fn succeeded_on_the_second_attempt(client: &kube::Client, ns: &str, job: &str) -> StepStatus {
    let done = wait_succeeded(client, ns, job, Duration::from_secs(300)).await;
    let segment = done
        .status
        .unwrap()
        .step(StepId::Segment(0))
        .unwrap()
        .clone();
    println!("segment 0: {segment:?}");
    assert_eq!(
        (segment.attempts, &segment.failed_attempts[..]),
        (2, &[1][..])
    );
    segment
}

/// The test node's name (the cluster has one node).
async fn the_node(client: &kube::Client) -> String {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.list(&ListParams::default()).await.unwrap().items[0].name_any()
}

/// The `nvidia.com/gpu` the node advertises set to `gpus` until dropped, then
/// set back to what it was.
struct AdvertisedGpus {
    node: String,
    before: String,
}

impl AdvertisedGpus {
    fn set(node: &str, gpus: &str) -> AdvertisedGpus {
        let before = kubectl_ok(&[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.capacity.nvidia\\.com/gpu}",
        ]);
        let before = before.trim().to_owned();
        assert!(
            !before.is_empty(),
            "node {node} advertises no nvidia.com/gpu"
        );
        assert!(
            advertise_gpus(node, gpus),
            "setting {node}'s GPUs to {gpus}"
        );
        AdvertisedGpus {
            node: node.to_owned(),
            before,
        }
    }
}

impl Drop for AdvertisedGpus {
    fn drop(&mut self) {
        if !advertise_gpus(&self.node, &self.before) {
            eprintln!(
                "setting {}'s GPUs back to {} failed",
                self.node, self.before
            );
        }
    }
}

fn advertise_gpus(node: &str, gpus: &str) -> bool {
    let patch = format!(
        r#"{{"status":{{"capacity":{{"nvidia.com/gpu":"{gpus}"}},"allocatable":{{"nvidia.com/gpu":"{gpus}"}}}}}}"#
    );
    kubectl(&[
        "patch",
        "node",
        node,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ])
    .status
    .success()
}

/// Waits until pod `name` in `ns` exists and `check` holds for it.
async fn wait_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_until(Duration::from_secs(120), what, || async {
        Ok(pods.get_opt(name).await?.is_some_and(|p| check(&p)))
    })
    .await
    .unwrap();
    pods.get(name).await.unwrap()
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

/// The kubelet refuses a pod that the scheduler's view let through, as when a
/// device plugin reports fewer healthy GPUs than the scheduler counted: here
/// the node advertises no GPU and the pod is bound to it by hand. The pod
/// fails with `OutOfnvidia.com/gpu` and no container state; that is a failed
/// attempt, retried, and once the GPUs are back the job succeeds.
#[tokio::test]
async fn a_pod_the_kubelet_refuses_to_admit_is_a_failed_attempt_and_is_retried() {
    let client = client().await;
    let ns = "e2e-admission";
    fresh_namespace(&client, ns).await.unwrap();
    let node = the_node(&client).await;
    let no_gpus = AdvertisedGpus::set(&node, "0");
    let mut job = preview_job("refused");
    job.spec.runner.device = ComputeDevice::Gpu;
    job.spec.runner.gpus = 1;
    job.spec.backoff_limit = 2;
    create_job(&client, ns, &job).await.unwrap();

    wait_pod(&client, ns, "refused-seg-0-1", "the first pod", |_| true).await;
    let binding = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "refused-seg-0-1"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        "refused-seg-0-1",
        &PostParams::default(),
        &binding,
    )
    .await
    .unwrap();
    let refused = wait_pod(
        &client,
        ns,
        "refused-seg-0-1",
        "the kubelet's refusal",
        |p| pod_phase(p) == "Failed",
    )
    .await;
    let reason = refused.status.as_ref().and_then(|s| s.reason.clone());
    println!("refused: {:?}", refused.status);
    assert_eq!(reason.as_deref(), Some("OutOfnvidia.com/gpu"));
    drop(no_gpus);

    let segment = succeeded_on_the_second_attempt(&client, ns, "refused").await;
    let why = segment.last_failure.unwrap_or_default();
    assert!(why.contains("OutOfnvidia.com/gpu"), "{why}");
}

/// A node lost with a step's pod on it: its kubelet stops answering
/// ([`PausedNode`]) and the pod is deleted, which is what the node lifecycle
/// controller's eviction from an unreachable node does (that controller is
/// off on the test control plane, where a loaded 2-core machine must not lose
/// its only node by accident, so the test takes its one action). Nobody
/// confirms the deletion: the step waits out the grace period and
/// `LOST_AFTER`, counts a failed attempt and starts another pod; once the node
/// is back the job succeeds, one pod per attempt.
#[tokio::test]
async fn a_pod_on_a_lost_node_is_given_up_and_retried() {
    let client = client().await;
    let ns = "e2e-lost-node";
    fresh_namespace(&client, ns).await.unwrap();
    let lost_node = PausedNode::pause().unwrap();
    let mut job = preview_job("lost");
    job.spec.backoff_limit = 2;
    create_job(&client, ns, &job).await.unwrap();
    wait_pod(
        &client,
        ns,
        "lost-seg-0-1",
        "the first pod on the node",
        |p| p.spec.as_ref().is_some_and(|s| s.node_name.is_some()),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.delete("lost-seg-0-1", &DeleteParams::default())
        .await
        .unwrap();

    let segment = second_attempt(&client, ns, "lost", Duration::from_secs(240)).await;
    println!("segment 0: {segment:?}");
    assert_eq!(segment.failed_attempts, [1]);
    let why = segment.last_failure.unwrap_or_default();
    assert!(why.contains("its node lost"), "{why}");
    let unconfirmed = pods.get_opt("lost-seg-0-1").await.unwrap();
    assert!(
        unconfirmed.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "the lost pod is still there, its deletion unconfirmed"
    );

    drop(lost_node);
    succeeded_on_the_second_attempt(&client, ns, "lost").await;
    wait_until(
        Duration::from_secs(120),
        "the lost pod to be gone",
        || async { Ok(pods.get_opt("lost-seg-0-1").await?.is_none()) },
    )
    .await
    .unwrap();
    assert_eq!(
        pod_names(&client, ns, "lost").await,
        BTreeSet::from([
            "lost-seg-0-2".to_string(),
            "lost-seg-1-1".to_string(),
            "lost-stitch-1".to_string()
        ])
    );
}

/// A pod past `activeDeadlineSeconds` (the kubelet's `DeadlineExceeded`; its
/// image cannot be pulled here, so the 3 s deadline passes first) fails its
/// step at once: another attempt would meet the same deadline.
#[tokio::test]
async fn a_pod_past_its_deadline_fails_the_job_at_once() {
    let client = client().await;
    let mut job = preview_job("deadline");
    job.spec.runner.image = Some("127.0.0.1:9/kubewan/kubewan-runner:slow".into());
    job.spec.runner.image_pull_policy = Some("Always".into());
    job.spec.active_deadline_seconds = Some(3);
    job.spec.backoff_limit = 2;
    let (status, message) = run_to_failure(&client, "e2e-deadline", &job).await;
    assert!(
        message.starts_with("segment 0 failed after 1 attempt (pod deadline-seg-0-1)")
            && message.contains("DeadlineExceeded")
            && message.contains("another attempt cannot help"),
        "{message}"
    );
    assert_eq!(
        status.step(StepId::Segment(0)).unwrap().failed_attempts,
        [1]
    );
}

/// A runner killed for its memory limit (the kernel's OOM kill under the
/// pod's cgroup, 6 MiB here: whichever step needs more first) is a failed
/// attempt: retried, then the job fails naming the OOM kill.
#[tokio::test]
async fn a_runner_killed_for_its_memory_limit_is_retried_then_fails_the_job() {
    let client = client().await;
    let mut job = preview_job("oom");
    job.spec.runner.memory_limit = Some("6Mi".into());
    job.spec.backoff_limit = 1;
    let (status, message) = run_to_failure(&client, "e2e-oom", &job).await;
    assert!(
        message.contains(" failed after 2 attempts (pod oom-")
            && message.contains("exit code 137: OOMKilled"),
        "{message}"
    );
    let failed: Vec<&StepStatus> = status
        .segments
        .iter()
        .map(|s| &s.step)
        .chain(&status.stitch)
        .filter(|s| s.phase == StepPhase::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{status:?}");
    assert_eq!(failed[0].failed_attempts, [1, 2]);
}
