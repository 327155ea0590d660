//! The operator's RBAC is the least that works: every verb of the chart's
//! ClusterRole and leader-election Role is taken away in turn, the operator
//! is run under what is left, and what then fails is shown — the API
//! server's refusal of exactly that request in the operator's log, and where
//! a user would see it, the job (no status, no pod, no event, not deleted,
//! not stopped). A verb the chart grants that no case here needs fails the
//! test. The in-cluster operator is scaled to 0 meanwhile; this test runs the
//! operator's binary (target/debug, built by tests/e2e/run.sh) out of
//! cluster, impersonating the chart's ServiceAccount, so each run starts
//! with no cached watch or connection. Everything is put back on the way out.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kubewan_crds::TravelJob;
use kubewan_crds::status::JobPhase;
use kubewan_e2e::*;
use serde_json::{Value, json};

const NS: &str = "e2e-rbac";
const SA: &str = "system:serviceaccount:kubewan-system:kubewan";
const CLUSTER_ROLE: &str = "clusterrole/kubewan";
const LEASE_ROLE: &str = "role/kubewan-leader-election";

/// One verb the chart grants: the role holding it, API group, resource, verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    role: &'static str,
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
}

/// What needs a grant: the job to run and what shows the grant missing.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// An invalid job: the operator fails it (status, event) at once.
    Invalid,
    /// An invalid job with ttlSecondsAfterFinished 0: failed, then deleted.
    InvalidWithTtl,
    /// An invalid job whose spec then changes to another invalid one: the
    /// second InvalidSpec event is the first one's series (a patch).
    InvalidTwice,
    /// A valid job: its first pod is created.
    CreatesPod,
    /// A valid job whose pod cannot schedule, then suspended: the pod is deleted.
    SuspendsPod,
}

use Scenario::*;

/// Every grant the chart should give, with the scenario that needs it.
const CASES: [(Grant, Scenario); 13] = [
    (
        grant(CLUSTER_ROLE, "kubewan.dev", "traveljobs", "list"),
        Invalid,
    ),
    (
        grant(CLUSTER_ROLE, "kubewan.dev", "traveljobs", "watch"),
        Invalid,
    ),
    (
        grant(CLUSTER_ROLE, "kubewan.dev", "traveljobs", "delete"),
        InvalidWithTtl,
    ),
    (
        grant(CLUSTER_ROLE, "kubewan.dev", "traveljobs/status", "patch"),
        Invalid,
    ),
    (grant(CLUSTER_ROLE, "", "pods", "list"), Invalid),
    (grant(CLUSTER_ROLE, "", "pods", "watch"), Invalid),
    (grant(CLUSTER_ROLE, "", "pods", "create"), CreatesPod),
    (grant(CLUSTER_ROLE, "", "pods", "delete"), SuspendsPod),
    (
        grant(CLUSTER_ROLE, "events.k8s.io", "events", "create"),
        Invalid,
    ),
    (
        grant(CLUSTER_ROLE, "events.k8s.io", "events", "patch"),
        InvalidTwice,
    ),
    (
        grant(LEASE_ROLE, "coordination.k8s.io", "leases", "get"),
        Invalid,
    ),
    (
        grant(LEASE_ROLE, "coordination.k8s.io", "leases", "update"),
        Invalid,
    ),
    // Last: its case deletes the lease (only a missing lease is created).
    (
        grant(LEASE_ROLE, "coordination.k8s.io", "leases", "create"),
        Invalid,
    ),
];

const fn grant(
    role: &'static str,
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
) -> Grant {
    Grant {
        role,
        group,
        resource,
        verb,
    }
}

/// A role as installed (`kubectl get -o json`).
fn role_json(role: &str) -> Value {
    let args = ["get", role, "-n", RELEASE_NS, "-o", "json"];
    serde_json::from_str(&kubectl_ok(&args)).unwrap()
}

fn set_rules(role: &str, rules: &Value) {
    let patch = json!({ "rules": rules }).to_string();
    kubectl_ok(&[
        "patch", role, "-n", RELEASE_NS, "--type", "merge", "-p", &patch,
    ]);
}

/// A grant as (role, group, resource, verb).
type GrantKey = (String, String, String, String);

fn key(g: Grant) -> GrantKey {
    (
        g.role.into(),
        g.group.into(),
        g.resource.into(),
        g.verb.into(),
    )
}

/// Every (group, resource, verb) a role's rules grant.
fn grants_of(role: &str, rules: &Value) -> BTreeSet<GrantKey> {
    let mut found = BTreeSet::new();
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    for rule in rules.as_array().unwrap() {
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                for verb in strs(&rule["verbs"]) {
                    found.insert((role.into(), group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    found
}

/// `rules` without `g`'s verb (a rule left with no verb is dropped).
fn without(rules: &Value, g: Grant) -> Value {
    let mut out = Vec::new();
    for rule in rules.as_array().unwrap() {
        let mut rule = rule.clone();
        let has = |key: &str, value: &str| rule[key].as_array().unwrap().iter().any(|v| v == value);
        if has("apiGroups", g.group) && has("resources", g.resource) && has("verbs", g.verb) {
            let verbs: Vec<Value> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| *v != g.verb)
                .cloned()
                .collect();
            if verbs.is_empty() {
                continue;
            }
            rule["verbs"] = Value::from(verbs);
        }
        out.push(rule);
    }
    Value::from(out)
}

/// Whether the ServiceAccount may do `g` (as the API server's authorizer sees it now).
fn sa_can(g: Grant) -> bool {
    let (resource, subresource) = match g.resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (g.resource, None),
    };
    let mut what = if g.group.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}.{}", g.group)
    };
    let ns = if g.role == LEASE_ROLE {
        what.push_str("/kubewan-leader");
        RELEASE_NS
    } else {
        NS
    };
    let mut args = vec!["auth", "can-i", g.verb, &what, "-n", ns, "--as", SA];
    let sub;
    if let Some(s) = subresource {
        sub = format!("--subresource={s}");
        args.push(&sub);
    }
    let out = kubectl(&args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// The chart's roles, the in-cluster operator and the lease, put back
/// whatever the test did.
struct Restore {
    rules: Vec<(&'static str, Value)>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (role, rules) in &self.rules {
            set_rules(role, rules);
        }
        if let Err(e) = operator(&["scale", "1"]) {
            eprintln!("could not scale the operator back to 1: {e}");
        }
    }
}

/// The operator's binary, as tests/e2e/run.sh built it.
fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("kubewan-operator");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build -p kubewan-operator` (tests/e2e/run.sh does)",
        bin.display()
    );
    bin
}

/// The operator running out of cluster as the chart's ServiceAccount, its
/// log in a file; stopped (SIGTERM, releasing the lease) when dropped.
struct LocalOperator {
    child: Child,
    log: PathBuf,
}

impl LocalOperator {
    fn start(name: &str) -> LocalOperator {
        let log = std::env::temp_dir().join(format!("kubewan-rbac-{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(operator_binary())
            .args([
                "--metrics-addr=127.0.0.1:0",
                "--log-format=text",
                "--leader-elect",
                "--lease-namespace=kubewan-system",
                "--lease-name=kubewan-leader",
                "--lease-duration-seconds=10",
                "--identity=rbac-probe",
                "--allowed-volume-kinds=persistentVolumeClaim,hostPath",
                "--as",
                SA,
                "--as-group=system:serviceaccounts,system:serviceaccounts:kubewan-system",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        LocalOperator { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LocalOperator {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The API server's refusal of `g`, as the operator logs it.
fn refusal(g: Grant) -> String {
    format!("cannot {} resource \\\"{}\\\"", g.verb, g.resource)
}

fn refused_in(log: &str, g: Grant) -> bool {
    // Display and Debug of the error: quotes plain or escaped.
    let plain = format!("cannot {} resource \"{}\"", g.verb, g.resource);
    log.contains(&plain) || log.contains(&refusal(g))
}

fn job_api(client: &Client) -> Api<TravelJob> {
    Api::namespaced(client.clone(), NS)
}

fn cheap_job(name: &str, invalid: bool) -> TravelJob {
    let mut job = preview_job(name);
    if invalid {
        job.spec.keyframes[0] = "../escape.png".into();
    }
    job
}

fn phase(j: &TravelJob) -> Option<JobPhase> {
    j.status.as_ref().map(|s| s.phase)
}

/// Runs `scenario` as job `name` under the operator `op`: with nothing
/// `missing`, until it worked; else until the operator's log shows the API
/// server refusing the missing verb, and what the job shows of it.
async fn run_scenario(
    client: &Client,
    op: &LocalOperator,
    name: &str,
    scenario: Scenario,
    missing: Option<Grant>,
) {
    let jobs = job_api(client);
    let mut job = cheap_job(name, !matches!(scenario, CreatesPod | SuspendsPod));
    if matches!(scenario, InvalidWithTtl) {
        job.spec.ttl_seconds_after_finished = Some(0);
    }
    if matches!(scenario, SuspendsPod) {
        job.spec.runner.node_selector =
            [("kubewan.dev/no-such-node".to_owned(), "x".to_owned())].into();
    }
    create_job(client, NS, &job).await.unwrap();
    // Each wait ends as soon as what it waits for shows; the bound only has
    // to hold on a loaded machine (30 s did not, with a load average of 38).
    let wait = Duration::from_secs(90);
    match scenario {
        Invalid | InvalidWithTtl | InvalidTwice => {
            let failed = |j: &TravelJob| phase(j) == Some(JobPhase::Failed);
            match missing {
                // No status, or no event, or not deleted: below, by the log.
                Some(_) => {}
                None if matches!(scenario, InvalidWithTtl) => {
                    wait_until(wait, "the finished job deleted after its TTL", || async {
                        Ok(jobs.get_opt(name).await?.is_none())
                    })
                    .await
                    .unwrap();
                }
                None => {
                    wait_job(client, NS, name, wait, "Failed", failed)
                        .await
                        .unwrap();
                    wait_until(wait, "an InvalidSpec event", || async {
                        Ok(events_of(client, NS, name)
                            .await?
                            .iter()
                            .any(|e| e.reason.as_deref() == Some("InvalidSpec")))
                    })
                    .await
                    .unwrap();
                }
            }
            if matches!(scenario, InvalidTwice) {
                if missing.is_some() {
                    wait_job(client, NS, name, wait, "Failed", failed)
                        .await
                        .unwrap();
                }
                wait_until(wait, "the first InvalidSpec event", || async {
                    Ok(!events_of(client, NS, name).await?.is_empty())
                })
                .await
                .unwrap();
                let patch = json!({"spec": {"keyframes": ["../other.png", "keyframes/02-hills.png", "keyframes/03-city.png"]}});
                jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
                if missing.is_none() {
                    wait_until(wait, "the InvalidSpec event's series", || async {
                        Ok(events_of(client, NS, name)
                            .await?
                            .iter()
                            .any(|e| e.series.as_ref().is_some_and(|s| s.count >= 2)))
                    })
                    .await
                    .unwrap();
                }
            }
        }
        CreatesPod => {
            wait_until(
                wait,
                "the first pod, or its refusal in the status",
                || async {
                    let j = jobs.get(name).await?;
                    let message = j
                        .status
                        .as_ref()
                        .and_then(|s| s.message.clone())
                        .unwrap_or_default();
                    Ok(match missing {
                        None => !job_pods(client, NS, name).await?.is_empty(),
                        Some(_) => {
                            message.contains("could not be created")
                                && message.contains("forbidden")
                        }
                    })
                },
            )
            .await
            .unwrap();
        }
        SuspendsPod => {
            wait_until(wait, "the unschedulable pod", || async {
                Ok(!job_pods(client, NS, name).await?.is_empty())
            })
            .await
            .unwrap();
            let patch = json!({"spec": {"suspend": true}});
            jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            // Without delete the reconcile fails before its status is written.
            if missing.is_none() {
                wait_job(client, NS, name, wait, "Suspended", |j| {
                    phase(j) == Some(JobPhase::Suspended)
                })
                .await
                .unwrap();
                wait_until(wait, "the pod deleted on suspend", || async {
                    Ok(job_pods(client, NS, name)
                        .await?
                        .iter()
                        .all(|p| p.metadata.deletion_timestamp.is_some()))
                })
                .await
                .unwrap();
            }
        }
    }
    if let Some(g) = missing {
        wait_until(
            wait,
            &format!("the operator's log to show `{}`", refusal(g)),
            || async { Ok(refused_in(&op.log(), g)) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", op.log()));
        // What a user sees, where the missing verb shows in the job.
        let j = jobs.get_opt(name).await.unwrap();
        match (g.resource, g.verb) {
            ("traveljobs", "list") | ("traveljobs/status", "patch") | ("leases", _) => {
                assert_eq!(j.and_then(|j| j.status), None, "{g:?}: no status");
            }
            ("traveljobs", "delete") => {
                assert!(
                    j.is_some_and(|j| phase(&j) == Some(JobPhase::Failed)),
                    "{g:?}: still there"
                );
            }
            ("events", "create") => {
                assert!(
                    events_of(client, NS, name).await.unwrap().is_empty(),
                    "{g:?}: no event"
                );
            }
            ("pods", "delete") => {
                let pods = job_pods(client, NS, name).await.unwrap();
                assert!(
                    pods.iter().any(|p| p.metadata.deletion_timestamp.is_none()),
                    "{g:?}: the pod stays"
                );
            }
            _ => {}
        }
    }
    let _ = kubectl(&["delete", "tj", name, "-n", NS, "--wait=false"]);
}

#[tokio::test]
async fn every_verb_of_the_operators_rbac_is_needed() {
    let client = client().await;
    fresh_namespace(&client, NS).await.unwrap();
    let roles = [CLUSTER_ROLE, LEASE_ROLE];
    let installed: Vec<(&'static str, Value)> = roles
        .iter()
        .map(|r| (*r, role_json(r)["rules"].clone()))
        .collect();
    let granted: BTreeSet<GrantKey> = installed
        .iter()
        .flat_map(|(r, rules)| grants_of(r, rules))
        .collect();
    let needed: BTreeSet<GrantKey> = CASES.iter().map(|(g, _)| key(*g)).collect();
    assert_eq!(
        granted, needed,
        "the chart grants exactly the verbs shown needed below"
    );

    let _restore = Restore {
        rules: installed.clone(),
    };
    println!("{}", operator(&["scale", "0"]).unwrap());

    // With every grant, each scenario works (so what fails below is the
    // missing verb, not the scenario).
    {
        let op = LocalOperator::start("all");
        for (i, scenario) in [
            Invalid,
            InvalidWithTtl,
            InvalidTwice,
            CreatesPod,
            SuspendsPod,
        ]
        .into_iter()
        .enumerate()
        {
            run_scenario(&client, &op, &format!("all-{i}"), scenario, None).await;
        }
        assert!(!op.log().contains("forbidden"), "{}", op.log());
    }

    for (i, (g, scenario)) in CASES.iter().enumerate() {
        let (role, rules) = installed.iter().find(|(r, _)| *r == g.role).unwrap();
        set_rules(role, &without(rules, *g));
        wait_until(
            Duration::from_secs(10),
            "the authorizer to see the change",
            || async { Ok(!sa_can(*g)) },
        )
        .await
        .unwrap();
        if g.resource == "leases" && g.verb == "create" {
            // Only a missing lease is created.
            let _ = kubectl(&["delete", "lease", "kubewan-leader", "-n", RELEASE_NS]);
        }
        println!(
            "without {} {} {}/{}: {scenario:?}",
            g.role, g.verb, g.group, g.resource
        );
        let op = LocalOperator::start(&format!("case-{i}"));
        run_scenario(&client, &op, &format!("without-{i}"), *scenario, Some(*g)).await;
        drop(op);
        set_rules(role, rules);
    }
}
