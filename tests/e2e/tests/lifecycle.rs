//! Lifecycle: garbage collection on delete, no duplicate pod across an operator
//! restart, suspend/resume, ttlSecondsAfterFinished, GPU scheduling, and the
//! operator's identity (the chart's ServiceAccount and RBAC).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kubewan_crds::TravelJob;
use kubewan_crds::status::JobPhase;
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
async fn restarting_the_operator_mid_job_creates_no_duplicate_pod() {
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
    // A crash (SIGKILL: no lease release, no clean shutdown), then a new process.
    println!("{}", operator("kill").unwrap());
    // Without an operator nothing new starts, so the job is really mid-way.
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    println!("{}", operator("start").unwrap());

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
        let labels = pod.labels();
        let step = format!(
            "{}{}",
            labels["kubewan.dev/stage"],
            labels
                .get("kubewan.dev/segment")
                .cloned()
                .unwrap_or_default()
        );
        *steps.entry(step).or_insert(0) += 1;
        assert_eq!(
            labels["kubewan.dev/attempt"], "1",
            "no step ran twice: {names:?}"
        );
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
                phase == "Succeeded" || phase == "Failed"
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
    let mut job = example();
    job.metadata.name = Some("gpu".into());
    job.spec.enhance_prompt.enabled = false;
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
        let spec = pod.spec.unwrap();
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        let stage = pod.metadata.labels.as_ref().unwrap()["kubewan.dev/stage"].clone();
        if stage == "stitch" {
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
    let can = |verb: &str, what: &str, ns: &str| {
        let out = kubectl(&["auth", "can-i", verb, what, "-n", ns, "--as", sa]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(can("create", "pods", "e2e-example"), "yes");
    assert_eq!(
        can("patch", "traveljobs.kubewan.dev/status", "e2e-example"),
        "yes"
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

    // The running operator holds the chart's lease...
    let client = client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kubewan-system");
    let lease = leases.get("kubewan-leader").await.unwrap();
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(!holder.is_empty(), "the operator holds the lease");
    // ...and its health endpoints answer.
    assert_eq!(http_get("/healthz").await.unwrap().0, 200);
    assert_eq!(http_get("/readyz").await.unwrap().0, 200);
    let (_, metrics) = http_get("/metrics").await.unwrap();
    assert!(metrics.contains("kubewan_leader 1"), "{metrics}");
    // The operator process was started with impersonation of the chart's account.
    let status = operator("status").unwrap();
    assert!(status.contains(sa), "{status}");
}

/// Puts the usual single operator back whatever the test did.
struct RestoreOperator<'a> {
    second: [(&'a str, &'a str); 2],
}

impl Drop for RestoreOperator<'_> {
    fn drop(&mut self) {
        let _ = operator_with("stop", &self.second);
        if let Err(e) = operator("start") {
            eprintln!("could not restart the operator: {e}");
        }
    }
}

#[tokio::test]
async fn a_second_replica_waits_for_the_lease_and_takes_over() {
    let client = client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kubewan-system");
    let holder = || async {
        leases
            .get("kubewan-leader")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    let first = holder().await;
    assert!(!first.is_empty(), "the first replica leads");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let second = [
        ("KUBEWAN_E2E_INSTANCE", "2"),
        ("KUBEWAN_E2E_METRICS_ADDR", addr.as_str()),
    ];
    let _restore = RestoreOperator { second };
    println!("{}", operator_with("start", &second).unwrap());

    // Ready, but standing by: it does not lead while the first holds the lease.
    assert_eq!(http_get_at(&addr, "/readyz").await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, metrics) = http_get_at(&addr, "/metrics").await.unwrap();
    assert!(metrics.contains("kubewan_leader 0"), "{metrics}");
    assert_eq!(holder().await, first);

    // The leader stops (and releases the lease): the standby takes over...
    println!("{}", operator("stop").unwrap());
    wait_until(
        Duration::from_secs(30),
        "the second replica to lead",
        || async {
            let (_, m) = http_get_at(&addr, "/metrics").await?;
            Ok(m.contains("kubewan_leader 1"))
        },
    )
    .await
    .unwrap();
    let now = holder().await;
    assert!(
        !now.is_empty() && now != first,
        "lease holder {now} (was {first})"
    );

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
