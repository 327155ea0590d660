//! Failures: a failing pod is retried then fails the job with a clear message
//! and nothing downstream starts; invalid TravelJobs are rejected by the CRD
//! schema or failed by the operator's validation, with clear messages.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::ResourceExt;
use kubewan_crds::status::StepPhase;
use kubewan_e2e::*;

#[tokio::test]
async fn a_failing_pod_is_retried_then_fails_the_job_and_the_stitch_never_starts() {
    let client = client().await;
    let ns = "e2e-failure";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("broken".into());
    job.spec.keyframes[1] = "keyframes/does-not-exist.png".into();
    job.spec.enhance_prompt.enabled = false;
    job.spec.backoff_limit = 1;
    create_job(&client, ns, &job).await.unwrap();

    let (status, message) = wait_failed(&client, ns, "broken", Duration::from_secs(300)).await;
    assert!(
        message.starts_with("segment 0 failed after 2 attempts (pod broken-seg-0-2)"),
        "{message}"
    );
    assert!(
        message.contains("does-not-exist.png"),
        "the pod's own message is included: {message}"
    );
    assert!(
        message.contains("not started: segment 1, stitch"),
        "{message}"
    );
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "BackoffLimitExceeded")
    );
    assert_eq!(status.segments[0].step.phase, StepPhase::Failed);
    assert_eq!(status.segments[0].step.attempts, 2);
    assert_eq!(status.segments[1].step.phase, StepPhase::Pending);
    assert_eq!(status.stitch.as_ref().unwrap().phase, StepPhase::Pending);

    // Exactly the two attempts of segment 0 ran; no dependant was created.
    let names: BTreeSet<String> = job_pods(&client, ns, "broken")
        .await
        .unwrap()
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["broken-seg-0-1".to_string(), "broken-seg-0-2".to_string()])
    );

    let events = events_of(&client, ns, "broken").await.unwrap();
    let reasons: BTreeSet<String> = events.iter().filter_map(|e| e.reason.clone()).collect();
    assert!(
        reasons.contains("BackOff") && reasons.contains("Failed"),
        "{reasons:?}"
    );

    // It stays failed: no late pod appears.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(job_pods(&client, ns, "broken").await.unwrap().len(), 2);
}

#[tokio::test]
async fn the_crd_schema_rejects_a_job_with_one_keyframe() {
    let client = client().await;
    let ns = "e2e-invalid-schema";
    fresh_namespace(&client, ns).await.unwrap();
    let yaml = "apiVersion: kubewan.dev/v1alpha1\nkind: TravelJob\nmetadata: {name: lonely}\nspec:\n  keyframes: [keyframes/01-sunrise.png]\n  checkpoints: {hostPath: {path: /var/lib/kubewan/ckpts}}\n  inputs: {hostPath: {path: /var/lib/kubewan/inputs}}\n  output: {volume: {hostPath: {path: /var/lib/kubewan/output}}}\n";
    let file = std::env::temp_dir().join("kubewan-e2e-lonely.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = kubectl(&["apply", "-n", ns, "-f", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(!out.status.success(), "a single keyframe must be rejected");
    assert!(
        stderr.contains("spec.keyframes") && stderr.contains("at least 2"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_operator_fails_an_invalid_job_naming_every_problem() {
    let client = client().await;
    let ns = "e2e-invalid";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("escape".into());
    job.spec.keyframes = vec!["../../etc/passwd".into(), "keyframes/02-hills.png".into()];
    job.spec.prompts.clear();
    job.spec.model.name = "/models/wan".into();
    // Passes the schema (the v1.20 API server ignores CEL rules): the operator
    // is what rejects it.
    create_job(&client, ns, &job).await.unwrap();
    let (status, message) = wait_failed(&client, ns, "escape", Duration::from_secs(60)).await;
    assert!(message.starts_with("invalid TravelJob: "), "{message}");
    assert!(
        message.contains("spec.keyframes[0]") && message.contains("'..'"),
        "{message}"
    );
    assert!(
        message.contains("spec.model.name") && message.contains("absolute"),
        "{message}"
    );
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.reason, "InvalidSpec");
    assert!(
        job_pods(&client, ns, "escape").await.unwrap().is_empty(),
        "no pod for an invalid job"
    );
    let events = events_of(&client, ns, "escape").await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidSpec")
                && e.type_.as_deref() == Some("Warning")),
        "{events:?}"
    );
    let describe = kubectl_ok(&["describe", "tj", "-n", ns, "escape"]);
    assert!(describe.contains("InvalidSpec"), "{describe}");
}

/// A pod the API server cannot create for a reason that may pass (here a
/// ResourceQuota of no pods: 403 Forbidden) is not a stuck job: the step's
/// status and a warning event carry the server's reason, the job keeps
/// trying, and once the quota is lifted it runs to the end.
#[tokio::test]
async fn a_pod_forbidden_by_a_quota_is_shown_and_created_once_the_quota_allows_it() {
    let client = client().await;
    let ns = "e2e-quota";
    fresh_namespace(&client, ns).await.unwrap();
    kubectl_ok(&["create", "quota", "no-pods", "-n", ns, "--hard=pods=0"]);
    // Until the quota controller has written the quota's status, the
    // admission plugin has no usage to check against and admits every pod.
    wait_until(Duration::from_secs(60), "the quota's status", || async {
        let hard = kubectl_ok(&[
            "get",
            "quota",
            "no-pods",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.hard.pods}",
        ]);
        Ok(hard.trim() == "0")
    })
    .await
    .unwrap();
    let job = preview_job("quota");
    create_job(&client, ns, &job).await.unwrap();

    let segment_message = |j: &kubewan_crds::TravelJob| {
        j.status
            .as_ref()
            .and_then(|s| s.step(kubewan_crds::StepId::Segment(0)))
            .and_then(|s| s.message.clone())
            .unwrap_or_default()
    };
    let waiting = wait_job(
        &client,
        ns,
        "quota",
        Duration::from_secs(120),
        "the quota's refusal in the segment's status",
        |j| segment_message(j).contains("could not be created"),
    )
    .await
    .unwrap();
    let message = segment_message(&waiting);
    println!("segment 0: {message}");
    assert!(
        message.starts_with("pod quota-seg-0-1 could not be created: ")
            && message.contains("forbidden")
            && message.contains("trying again in 15s"),
        "{message}"
    );
    let status = waiting.status.clone().unwrap();
    assert!(!status.phase.is_finished(), "{status:?}");
    assert!(job_pods(&client, ns, "quota").await.unwrap().is_empty());
    let events = events_of(&client, ns, "quota").await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("FailedCreatePod")),
        "{events:?}"
    );

    kubectl_ok(&["delete", "quota", "no-pods", "-n", ns]);
    // Nothing tells the operator the quota went: the pod is created at its
    // next try. Each refusal in a row doubles the wait (15 s, 30 s, ...); the
    // first one was seen (its message says 15 s) and the quota lifted seconds
    // later, so the pending try is the second (15 s) or at worst the third
    // (30 s). The job's own 300 s, and twice that longest wait.
    let done = wait_succeeded(&client, ns, "quota", Duration::from_secs(300 + 2 * 30)).await;
    assert_eq!(done.status.unwrap().segments[0].step.attempts, 1);
}
