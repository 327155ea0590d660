//! A spec that cannot escalate: the installed operator (tests/e2e/values.yaml:
//! the chart's runner repository, claims and hostPath) fails a job whose image
//! or volume kind the chart's values do not allow, with the field named, a
//! warning event and no pod; a claims-only job's runner pods, as the API
//! server stored them and the node ran them, pass every rule of the
//! "restricted" Pod Security Standard (checked rule by rule by
//! kubewan_operator::pod_security: this v1.20 API server predates Pod
//! Security admission); and the examples pass the policies they are meant for.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use kubewan_crds::TravelJob;
use kubewan_crds::spec::VolumeSource;
use kubewan_e2e::*;
use kubewan_operator::pod_security::restricted_violations;
use kubewan_operator::policy::{SpecPolicy, VolumeKind};
use serde_json::json;

const REASON: &str = "ForbiddenBySpecPolicy";

/// The value of the installed operator's `--NAME=` argument, if it has one.
fn operator_arg(name: &str) -> Option<String> {
    let args = kubectl_ok(&[
        "-n",
        RELEASE_NS,
        "get",
        "deploy/kubewan",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let prefix = format!("--{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

/// The runner image the installed operator gives jobs that set none.
fn default_runner_image() -> String {
    operator_arg("runner-image").expect("the operator's --runner-image")
}

/// Waits until `name` failed by the policy; returns its status message.
async fn forbidden_message(client: &Client, ns: &str, name: &str) -> String {
    let (status, message) = wait_failed(client, ns, name, Duration::from_secs(60)).await;
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.reason, REASON, "{status:?}");
    let events = events_of(client, ns, name).await.unwrap();
    assert!(
        events.iter().any(|e| e.reason.as_deref() == Some(REASON)
            && e.type_.as_deref() == Some("Warning")
            && e.note == status.message),
        "{events:?}"
    );
    assert!(
        job_pods(client, ns, name).await.unwrap().is_empty(),
        "no pod for a forbidden job"
    );
    message
}

#[tokio::test]
async fn a_forbidden_image_or_volume_kind_fails_the_job_naming_the_field_with_no_pod() {
    let client = client().await;
    let ns = "e2e-policy";
    fresh_namespace(&client, ns).await.unwrap();
    let default_image = default_runner_image();
    let repository = default_image.rsplit_once(':').unwrap().0.to_owned();

    let mut evil = preview_job("evil");
    evil.spec.runner.image = Some("evil.example/x:1".into());
    // Shares the allowed repository's name as a string prefix only.
    let mut lookalike = preview_job("lookalike");
    lookalike.spec.runner.image = Some(format!("{repository}-evil:1"));
    let mut nfs = preview_job("nfs");
    nfs.spec.output.volume =
        serde_json::from_value(json!({"nfs": {"server": "nfs.example", "path": "/videos"}}))
            .unwrap();
    // The chart's own runner repository, named explicitly, is allowed.
    let mut own = preview_job("own");
    own.spec.runner.image = Some(default_image.clone());
    for job in [&evil, &lookalike, &nfs, &own] {
        create_job(&client, ns, job).await.unwrap();
    }

    // The default runner's repository, then the chart's runner.allowedImages.
    let allowed: Vec<String> = std::iter::once(repository.clone())
        .chain(
            operator_arg("allowed-images")
                .unwrap_or_default()
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
        )
        .collect();
    let message = forbidden_message(&client, ns, "evil").await;
    println!("evil: {message}");
    assert_eq!(
        message,
        format!(
            "forbidden by this cluster's policy: spec.runner.image: \"evil.example/x:1\" is not \
             in the images this cluster allows ({})",
            allowed.join(", ")
        )
    );
    let message = forbidden_message(&client, ns, "lookalike").await;
    assert!(message.contains("spec.runner.image"), "{message}");
    let message = forbidden_message(&client, ns, "nfs").await;
    println!("nfs: {message}");
    assert_eq!(
        message,
        "forbidden by this cluster's policy: spec.output.volume: nfs volumes are not allowed \
         in this cluster (allowed: persistentVolumeClaim, hostPath)"
    );
    let describe = kubectl_ok(&["describe", "tj", "-n", ns, "nfs"]);
    assert!(describe.contains(REASON), "{describe}");

    wait_until(Duration::from_secs(60), "a pod of job own", || async {
        Ok(!job_pods(&client, ns, "own").await?.is_empty())
    })
    .await
    .unwrap();
    let pods = job_pods(&client, ns, "own").await.unwrap();
    let image = pods[0].spec.as_ref().unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some(default_image.as_str()));
}

/// The storage administrator's part: a hostPath PersistentVolume for the
/// node's `/var/lib/kubewan/<dir>`, bound to claim `<dir>` in `ns`.
async fn claim_of_node_dir(client: &Client, ns: &str, dir: &str, access: &str) {
    let pv_name = format!("{ns}-{dir}");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    if pvs.get_opt(&pv_name).await.unwrap().is_some() {
        pvs.delete(&pv_name, &DeleteParams::default())
            .await
            .unwrap();
        wait_until(Duration::from_secs(60), "the old volume gone", || async {
            Ok(pvs.get_opt(&pv_name).await?.is_none())
        })
        .await
        .unwrap();
    }
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": [access],
            "hostPath": {"path": format!("/var/lib/kubewan/{dir}"), "type": "Directory"},
            "claimRef": {"namespace": ns, "name": dir},
            "storageClassName": "",
        }
    }))
    .unwrap();
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": dir},
        "spec": {
            "accessModes": [access],
            "resources": {"requests": {"storage": "1Gi"}},
            "volumeName": pv_name,
            "storageClassName": "",
        }
    }))
    .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    claims.create(&PostParams::default(), &claim).await.unwrap();
}

fn claim(name: &str) -> VolumeSource {
    serde_json::from_value(json!({"persistentVolumeClaim": {"claimName": name}})).unwrap()
}

#[tokio::test]
async fn runner_pods_of_a_claims_only_job_pass_the_restricted_pod_security_standard() {
    let client = client().await;
    let ns = "e2e-restricted";
    fresh_namespace(&client, ns).await.unwrap();
    claim_of_node_dir(&client, ns, "ckpts", "ReadOnlyMany").await;
    claim_of_node_dir(&client, ns, "inputs", "ReadOnlyMany").await;
    claim_of_node_dir(&client, ns, "output", "ReadWriteMany").await;
    let mut job = preview_job("claims");
    job.spec.checkpoints = claim("ckpts");
    job.spec.inputs = claim("inputs");
    job.spec.output.volume = claim("output");
    create_job(&client, ns, &job).await.unwrap();
    let done = wait_succeeded(&client, ns, "claims", Duration::from_secs(300)).await;
    let output = done.status.unwrap().output.unwrap();
    check_mp4(&output_root().join(&output)).unwrap();

    let pods = job_pods(&client, ns, "claims").await.unwrap();
    assert_eq!(pods.len(), 3, "two segments and the stitch");
    for pod in &pods {
        let name = pod.name_any();
        // As the API server stored it, defaults and admission included.
        assert_eq!(restricted_violations(pod), vec![], "{name}");
        // As the node ran it.
        assert_confined(pod);
    }
}

/// The policy of a chart installed with the values in `files` (later wins),
/// as its Deployment passes them to the operator.
fn chart_policy(files: &[&str]) -> SpecPolicy {
    let mut repository = String::new();
    let mut kinds = Vec::new();
    let mut images = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        let values: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        if let Some(r) = values["runner"]["image"]["repository"].as_str() {
            repository = r.to_owned();
        }
        if let Some(list) = values["runner"]["allowedImages"].as_array() {
            images = list
                .iter()
                .map(|i| i.as_str().unwrap().to_owned())
                .collect();
        }
        if let Some(list) = values["volumes"]["allowedKinds"].as_array() {
            kinds = list
                .iter()
                .map(|k| k.as_str().unwrap().parse::<VolumeKind>().unwrap())
                .collect();
        }
    }
    SpecPolicy::new(&format!("{repository}:0.1.0"), &images, &kinds).unwrap()
}

#[test]
fn the_examples_pass_the_policies_they_are_meant_for() {
    let defaults = chart_policy(&["charts/kubewan/values.yaml"]);
    let test_cluster = chart_policy(&["charts/kubewan/values.yaml", "tests/e2e/values.yaml"]);
    let examples = repo_root().join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in text
            .split("\n---")
            .filter(|d| d.contains("kind: TravelJob"))
        {
            let job: TravelJob = serde_saphyr::from_str(doc).unwrap();
            let file = path.file_name().unwrap().to_string_lossy();
            // The test cluster's example mounts the node's folders (hostPath);
            // the others are for any cluster with the chart's defaults.
            let (policy, which) = if file == "traveljob.yaml" {
                assert!(defaults.admit(&job.spec).is_err(), "{file} needs hostPath");
                (&test_cluster, "tests/e2e/values.yaml")
            } else {
                (&defaults, "the chart's defaults")
            };
            if let Err(rejection) = policy.admit(&job.spec) {
                panic!("{file} under {which}: {}", rejection.message);
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked} TravelJobs in examples/");
}
