//! Lifecycle: garbage collection on delete, no duplicate pod across an operator
//! crash, suspend/resume, ttlSecondsAfterFinished, GPU scheduling, and the
//! in-cluster operator: its identity (the chart's ServiceAccount, RBAC and
//! in-cluster credentials), its container's restrictions, probes, metrics
//! Service and leader election between replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kubewan_crds::spec::ComputeDevice;
use kubewan_crds::status::JobPhase;
use kubewan_crds::{StepAttempt, StepId, TravelJob};
use kubewan_e2e::*;
use serde_json::json;

fn finished(j: &TravelJob) -> bool {
    j.status.as_ref().is_some_and(|s| s.phase.is_finished())
}

#[tokio::test]
async fn deleting_a_job_garbage_collects_its_pods() {
    let client = client().await;
    let ns = "e2e-gc";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("doomed".into());
    create_job(&client, ns, &job).await.unwrap();
    wait_until(Duration::from_secs(120), "a pod of the job", || async {
        Ok(!job_pods(&client, ns, "doomed").await?.is_empty())
    })
    .await
    .unwrap();
    let pod = &job_pods(&client, ns, "doomed").await.unwrap()[0];
    let owner = &pod.owner_references()[0];
    assert_eq!(owner.controller, Some(true));

    let jobs: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    jobs.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    // The controller-manager's garbage collector removes the pods.
    wait_until(
        Duration::from_secs(120),
        "the job's pods to be garbage-collected",
        || async { Ok(job_pods(&client, ns, "doomed").await?.is_empty()) },
    )
    .await
    .unwrap();
    assert!(jobs.get_opt("doomed").await.unwrap().is_none());
}

#[tokio::test]
async fn an_operator_crash_mid_job_creates_no_duplicate_pod() {
    let client = client().await;
    let ns = "e2e-restart";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("steady".into());
    create_job(&client, ns, &job).await.unwrap();
    wait_until(Duration::from_secs(120), "the first pod", || async {
        Ok(!job_pods(&client, ns, "steady").await?.is_empty())
    })
    .await
    .unwrap();
    let before: BTreeMap<String, String> = job_pods(&client, ns, "steady")
        .await
        .unwrap()
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    let jobs: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    let mid = jobs.get("steady").await.unwrap();
    assert!(
        !finished(&mid),
        "the job finished before the restart: {:?}",
        mid.status
    );
    assert!(before.len() < 4, "pods before the restart: {before:?}");
    // A crash (SIGKILL of the container: no lease release, no clean shutdown);
    // the kubelet restarts the container and the new process takes over.
    println!("{}", operator(&["kill"]).unwrap());

    let job = wait_job(
        &client,
        ns,
        "steady",
        Duration::from_secs(600),
        "finished",
        finished,
    )
    .await
    .unwrap();
    assert_eq!(
        job.status.as_ref().unwrap().phase,
        JobPhase::Succeeded,
        "{:?}",
        job.status
    );
    let pods = job_pods(&client, ns, "steady").await.unwrap();
    let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    let mut steps = BTreeMap::new();
    for pod in &pods {
        let run = StepAttempt::from_labels(pod.labels()).expect("a runner pod's labels");
        *steps.entry(run.step).or_insert(0) += 1;
        assert_eq!(run.attempt, 1, "no step ran twice: {names:?}");
    }
    assert_eq!(pods.len(), 4, "one pod per step: {names:?}");
    assert!(steps.values().all(|n| *n == 1), "{steps:?}");
    // The pods that existed before the crash are the very same objects after
    // it (same uid): none was deleted and created again.
    for (name, uid) in &before {
        let now = pods.iter().find(|p| &p.name_any() == name).unwrap();
        assert_eq!(now.uid().as_ref(), Some(uid), "{name} was recreated");
    }
}

#[tokio::test]
async fn suspend_stops_the_job_and_resume_finishes_it() {
    let client = client().await;
    let ns = "e2e-suspend";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("paused".into());
    job.spec.suspend = true;
    create_job(&client, ns, &job).await.unwrap();
    let j = wait_job(
        &client,
        ns,
        "paused",
        Duration::from_secs(60),
        "Suspended",
        |j| {
            j.status
                .as_ref()
                .is_some_and(|s| s.phase == JobPhase::Suspended)
        },
    )
    .await
    .unwrap();
    let suspended = j
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Suspended")
        .unwrap();
    assert_eq!(suspended.status, "True");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        job_pods(&client, ns, "paused").await.unwrap().is_empty(),
        "a suspended job starts no pod"
    );

    let jobs: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    let set_suspend = |on: bool| {
        let jobs = jobs.clone();
        async move {
            jobs.patch(
                "paused",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": on}})),
            )
            .await
            .unwrap();
        }
    };
    set_suspend(false).await;
    wait_until(Duration::from_secs(120), "a pod after resuming", || async {
        Ok(!job_pods(&client, ns, "paused").await?.is_empty())
    })
    .await
    .unwrap();
    // Suspend mid-run: running pods are deleted.
    set_suspend(true).await;
    wait_job(
        &client,
        ns,
        "paused",
        Duration::from_secs(60),
        "Suspended",
        |j| {
            j.status
                .as_ref()
                .is_some_and(|s| s.phase == JobPhase::Suspended || s.phase.is_finished())
        },
    )
    .await
    .unwrap();
    // The operator deletes the running pods. A deleted pod counts as stopped
    // once the API server has its deletion: how soon it disappears is the
    // kubelet's (Kubernetes 1.20's kubelet can keep a pod deleted while its
    // container was starting for a resync period). The runner's own prompt
    // stop on SIGTERM is runner/tests/run_task.rs's.
    wait_until(
        Duration::from_secs(60),
        "no active pod while suspended",
        || async {
            Ok(job_pods(&client, ns, "paused").await?.iter().all(|p| {
                let phase = p
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                phase == "Succeeded" || phase == "Failed" || p.metadata.deletion_timestamp.is_some()
            }))
        },
    )
    .await
    .unwrap();
    set_suspend(false).await;
    let j = wait_job(
        &client,
        ns,
        "paused",
        Duration::from_secs(600),
        "finished",
        finished,
    )
    .await
    .unwrap();
    assert_eq!(
        j.status.as_ref().unwrap().phase,
        JobPhase::Succeeded,
        "{:?}",
        j.status
    );
    let events = events_of(&client, ns, "paused").await.unwrap();
    let reasons: BTreeSet<String> = events.iter().filter_map(|e| e.reason.clone()).collect();
    assert!(
        reasons.contains("Suspended") && reasons.contains("Resumed"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_finished_job_is_deleted_after_its_ttl() {
    let client = client().await;
    let ns = "e2e-ttl";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("shortlived".into());
    job.spec.enhance_prompt.enabled = false;
    job.spec.ttl_seconds_after_finished = Some(3);
    create_job(&client, ns, &job).await.unwrap();
    let jobs: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    wait_until(
        Duration::from_secs(600),
        "the job to finish and be deleted",
        || async { Ok(jobs.get_opt("shortlived").await?.is_none()) },
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(120),
        "its pods to be garbage-collected",
        || async { Ok(job_pods(&client, ns, "shortlived").await?.is_empty()) },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn gpu_pods_request_the_gpu_and_do_not_schedule_beyond_capacity() {
    let client = client().await;
    let ns = "e2e-gpu";
    fresh_namespace(&client, ns).await.unwrap();
    // The preview loads no model, so its pods can hold a GPU on this CPU-only
    // node (the runner image is the CPU build: Wan would refuse cuda:0).
    let mut job = preview_job("gpu");
    job.spec.runner.device = ComputeDevice::Gpu;
    job.spec.runner.gpus = 1;
    create_job(&client, ns, &job).await.unwrap();
    let j = wait_job(
        &client,
        ns,
        "gpu",
        Duration::from_secs(600),
        "finished",
        finished,
    )
    .await
    .unwrap();
    assert_eq!(
        j.status.as_ref().unwrap().phase,
        JobPhase::Succeeded,
        "{:?}",
        j.status
    );
    for pod in job_pods(&client, ns, "gpu").await.unwrap() {
        let run = StepAttempt::from_labels(pod.labels()).expect("a runner pod's labels");
        let spec = pod.spec.unwrap();
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        if run.step == StepId::Stitch {
            assert!(
                !limits.contains_key("nvidia.com/gpu"),
                "the stitch is CPU-only"
            );
        } else {
            assert_eq!(limits.get("nvidia.com/gpu"), Some(&Quantity("1".into())));
        }
        assert_eq!(spec.node_name.as_deref(), Some("gpu-node-1"));
    }

    // More GPUs than the node has: the scheduler leaves the pod Pending.
    let mut greedy = example();
    greedy.metadata.name = Some("greedy".into());
    greedy.spec.enhance_prompt.enabled = false;
    greedy.spec.runner.device = ComputeDevice::Gpu;
    greedy.spec.runner.gpus = 1000;
    create_job(&client, ns, &greedy).await.unwrap();
    wait_until(
        Duration::from_secs(60),
        "the greedy pod to be unschedulable",
        || async {
            let pods = job_pods(&client, ns, "greedy").await?;
            Ok(pods.iter().any(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.type_ == "PodScheduled"
                                && c.status == "False"
                                && c.reason.as_deref() == Some("Unschedulable")
                        })
                    })
            }))
        },
    )
    .await
    .unwrap();
    // The status says why it waits, in the scheduler's words.
    let j = wait_job(
        &client,
        ns,
        "greedy",
        Duration::from_secs(60),
        "explained",
        |j| {
            j.status.as_ref().is_some_and(|s| {
                s.segments
                    .first()
                    .and_then(|seg| seg.step.message.as_deref())
                    .is_some_and(|m| {
                        m.contains("Unschedulable") && m.contains("Insufficient nvidia.com/gpu")
                    })
            })
        },
    )
    .await
    .unwrap();
    let status = j.status.unwrap();
    println!("greedy: {:?}", status.message);
    assert_eq!(status.phase, JobPhase::Generating);
}

#[tokio::test]
async fn the_operator_runs_under_the_charts_service_account_and_rbac() {
    require_cluster();
    let sa = "system:serviceaccount:kubewan-system:kubewan";
    let can_with = |verb: &str, what: &str, ns: &str, extra: &[&str]| {
        let mut args = vec!["auth", "can-i", verb, what, "-n", ns, "--as", sa];
        args.extend_from_slice(extra);
        let out = kubectl(&args);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let can = |verb: &str, what: &str, ns: &str| can_with(verb, what, ns, &[]);
    assert_eq!(can("create", "pods", "e2e-example"), "yes");
    // The status subresource only (`traveljobs.kubewan.dev/status` would be
    // the TravelJob named "status").
    assert_eq!(
        can_with(
            "patch",
            "traveljobs.kubewan.dev",
            "e2e-example",
            &["--subresource=status"]
        ),
        "yes"
    );
    assert_eq!(
        can("patch", "traveljobs.kubewan.dev", "e2e-example"),
        "no",
        "least privilege: the operator never changes a spec"
    );
    assert_eq!(
        can("get", "secrets", "e2e-example"),
        "no",
        "least privilege"
    );
    assert_eq!(
        can("create", "deployments.apps", "e2e-example"),
        "no",
        "least privilege"
    );
    assert_eq!(
        can(
            "update",
            "leases.coordination.k8s.io/kubewan-leader",
            "kubewan-system"
        ),
        "yes"
    );
    assert_eq!(
        can(
            "update",
            "leases.coordination.k8s.io/other",
            "kubewan-system"
        ),
        "no"
    );
    assert_eq!(
        can(
            "update",
            "leases.coordination.k8s.io/kubewan-leader",
            "default"
        ),
        "no"
    );

    // The operator runs in-cluster under the chart's ServiceAccount and holds
    // the chart's lease (its pod name is the holder identity)...
    let client = client().await;
    let leader = operator(&["leader"]).unwrap().trim().to_owned();
    assert!(!leader.is_empty(), "the operator holds the lease");
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let pod = pods.get(&leader).await.unwrap();
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("kubewan"));
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    // ...with in-cluster credentials (the projected token, the `kubernetes`
    // Service) in a restricted container, as the runtime applied it.
    let oci = runtime_spec(&pod).unwrap();
    assert_eq!(oci["process"]["user"]["uid"], 65532);
    assert_eq!(oci["root"]["readonly"], true);
    assert_eq!(oci["process"]["noNewPrivileges"], true);
    let mounts = oci["mounts"].as_array().unwrap();
    let token = mounts
        .iter()
        .find(|m| m["destination"] == "/var/run/secrets/kubernetes.io/serviceaccount")
        .expect("the operator's service-account token is mounted");
    assert!(
        token["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "ro")
    );
    let env: Vec<&str> = oci["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    assert!(
        env.contains(&"KUBERNETES_SERVICE_HOST=10.0.0.1"),
        "in-cluster configuration: {env:?}"
    );
    // Its health endpoints answer through the kubelet's probes (the pod is
    // Ready) and its metrics through the chart's Service.
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| c[0].ready);
    assert!(ready, "the readiness probe (/readyz) passes");
    assert_eq!(operator_get("/healthz").unwrap().trim(), "ok");
    let metrics = operator_get("/metrics").unwrap();
    assert!(metrics.contains("kubewan_leader 1"), "{metrics}");
}

/// Puts the usual single operator replica back whatever the test did.
struct RestoreOperator;

impl Drop for RestoreOperator {
    fn drop(&mut self) {
        if let Err(e) = operator(&["scale", "1"]) {
            eprintln!("could not scale the operator back to 1: {e}");
        }
    }
}

#[tokio::test]
async fn a_second_replica_waits_for_the_lease_and_takes_over() {
    let client = client().await;
    let first = operator(&["leader"]).unwrap().trim().to_owned();
    assert!(!first.is_empty(), "the first replica leads");

    let _restore = RestoreOperator;
    println!("{}", operator(&["scale", "2"]).unwrap());
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let replicas: Vec<String> = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    let second = replicas
        .iter()
        .find(|p| **p != first)
        .expect("a second replica")
        .clone();

    // Ready (its readiness probe passes), but standing by: it does not lead
    // while the first holds the lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = operator_pod_get(&second, "/metrics").unwrap();
    assert!(metrics.contains("kubewan_leader 0"), "{metrics}");
    assert_eq!(operator(&["leader"]).unwrap().trim(), first);

    // The leader's pod is deleted (SIGTERM: it releases the lease): a standby
    // takes over (the second, or the pod the Deployment starts in the first's
    // place, whichever takes the released lease first)...
    pods.delete(&first, &DeleteParams::default()).await.unwrap();
    wait_until(
        Duration::from_secs(60),
        "another replica to lead and hold the lease",
        || async {
            let holder = operator(&["leader"])?.trim().to_owned();
            Ok(!holder.is_empty()
                && holder != first
                && operator_pod_get(&holder, "/metrics")?.contains("kubewan_leader 1"))
        },
    )
    .await
    .unwrap();

    // ...and runs jobs.
    let ns = "e2e-ha";
    fresh_namespace(&client, ns).await.unwrap();
    let mut job = example();
    job.metadata.name = Some("handover".into());
    job.spec.enhance_prompt.enabled = false;
    create_job(&client, ns, &job).await.unwrap();
    let j = wait_job(
        &client,
        ns,
        "handover",
        Duration::from_secs(600),
        "finished",
        finished,
    )
    .await
    .unwrap();
    assert_eq!(
        j.status.as_ref().unwrap().phase,
        JobPhase::Succeeded,
        "{:?}",
        j.status
    );
}
