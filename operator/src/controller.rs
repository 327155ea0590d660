//! The TravelJob controller: one `reconcile`, one `error_policy`, a `Context`.
//! The decisions are pure ([`crate::decide`]); this module reads the pods,
//! carries the decision out and writes the status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kubewan_crds::{Plan, TravelJob};
use serde_json::json;

use crate::decide::{Decision, EventSpec, Settings, decide};
use crate::error::{Error, Result};
use crate::metrics::{ErrorLabels, Metrics, StageLabels};
use crate::pods::{LABEL_JOB, PodDefaults, build_pod, job_label_value, stage_of};
use crate::status::{PodView, set_conditions};

pub const FIELD_MANAGER: &str = "kubewan-operator";

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub pod_defaults: PodDefaults,
}

/// The runner pods of a job: labelled for it and controlled by it (by uid, so
/// a new job of the same name never adopts an old one's pods).
async fn list_pods(job: &TravelJob, pods: &Api<Pod>) -> Result<Vec<Pod>> {
    let uid = job.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let selector = format!("{LABEL_JOB}={}", job_label_value(&job.name_any()));
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .collect())
}

fn is_status(e: &kube::Error, codes: &[u16]) -> bool {
    matches!(e, kube::Error::Api(s) if codes.contains(&s.code))
}

pub async fn reconcile(job: Arc<TravelJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = crate::metrics::Timer::start(&ctx.metrics.reconcile_seconds);
    ctx.metrics.reconciles.inc();
    if job.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the pods (owner references).
        return Ok(Action::await_change());
    }
    let ns = job
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = job.name_any();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Api<TravelJob> = Api::namespaced(ctx.client.clone(), &ns);

    let pods = list_pods(&job, &pods_api).await?;
    let views: Vec<PodView> = pods.iter().filter_map(PodView::from_pod).collect();
    let now = Timestamp::now();
    let mut d: Decision = decide(&job, &views, &ctx.settings, now);

    for pod in &d.delete {
        match pods_api.delete(pod, &DeleteParams::background()).await {
            Ok(_) => {
                ctx.metrics.pods_deleted.inc();
                tracing::info!(job = %name, %pod, "deleted pod");
            }
            Err(e) if is_status(&e, &[404]) => {}
            Err(e) => return Err(e.into()),
        }
    }

    if !d.create.is_empty() {
        let plan = Plan::from_spec(&job.spec);
        for &(step, attempt) in &d.create {
            let pod = build_pod(&job, &plan, step, attempt, &ctx.pod_defaults)?;
            let pod_name = pod.name_any();
            match pods_api.create(&PostParams::default(), &pod).await {
                Ok(_) => {
                    ctx.metrics
                        .pods_created
                        .get_or_create(&StageLabels {
                            stage: stage_of(step).as_str().into(),
                        })
                        .inc();
                    if attempt > 1 {
                        ctx.metrics.retries.inc();
                    }
                    tracing::info!(job = %name, pod = %pod_name, ?step, attempt, "created pod");
                    d.events.push(EventSpec {
                        warning: false,
                        reason: "CreatedPod".into(),
                        action: "CreatePod".into(),
                        note: format!(
                            "created pod {pod_name} for {} (attempt {attempt})",
                            crate::status::step_name(step)
                        ),
                        pod: Some(pod_name.clone()),
                    });
                }
                // Deterministic names: the pod is already there (a stale cache
                // or a restart); never a duplicate.
                Err(e) if is_status(&e, &[409]) => {
                    tracing::debug!(job = %name, pod = %pod_name, "pod already exists");
                }
                // The API server refuses the pod itself (a bad quantity, a
                // forbidden field): retrying cannot help, so the job fails.
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    let message = format!(
                        "the API server rejected pod {pod_name} for {}: {}",
                        crate::status::step_name(step),
                        s.message
                    );
                    d.status.phase = kubewan_crds::JobPhase::Failed;
                    d.status.message = Some(message.clone());
                    d.status.completion_time =
                        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
                    set_conditions(&mut d.status, "PodRejected", job.metadata.generation, now);
                    d.events.push(EventSpec {
                        warning: true,
                        reason: "PodRejected".into(),
                        action: "CreatePod".into(),
                        note: message,
                        pod: Some(pod_name.clone()),
                    });
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    if job.status.as_ref() != Some(&d.status) {
        let patch = json!({
            "apiVersion": "kubewan.dev/v1alpha1",
            "kind": "TravelJob",
            "status": d.status,
        });
        jobs.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }

    let reference = job.object_ref(&());
    for ev in &d.events {
        let event = Event {
            type_: if ev.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: ev.reason.clone(),
            note: Some(kubewan_crds::report::shorten(&ev.note, 1000)),
            action: ev.action.clone(),
            secondary: ev.pod.as_ref().map(|pod| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            }),
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(job = %name, error = %e, reason = %ev.reason, "could not publish event");
        }
    }

    if d.delete_job {
        tracing::info!(job = %name, "ttlSecondsAfterFinished elapsed: deleting the TravelJob");
        match jobs
            .delete(
                &name,
                &DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, &[404]) => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    }

    Ok(match d.requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

pub fn error_policy(job: Arc<TravelJob>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job.name_any(), %error, "reconcile failed");
    ctx.metrics
        .failures
        .get_or_create(&ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    Action::requeue(error.retry_after())
}

/// Keeps the jobs-by-phase gauges in step with the controller's cache.
pub async fn observe_jobs(store: Store<TravelJob>, metrics: Arc<Metrics>) {
    loop {
        metrics.set_jobs(
            store
                .state()
                .iter()
                .map(|j| j.status.as_ref().map(|s| s.phase).unwrap_or_default()),
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Runs the controller until a shutdown signal arrives.
pub async fn run(client: Client, namespace: Option<String>, ctx: Arc<Context>) {
    let (jobs, pods): (Api<TravelJob>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let pod_watch = watcher::Config::default().labels(&format!(
        "{}={}",
        crate::pods::LABEL_MANAGED_BY,
        crate::pods::MANAGER
    ));
    let controller = Controller::new(jobs, watcher::Config::default()).owns(pods, pod_watch);
    tokio::spawn(observe_jobs(controller.store(), ctx.metrics.clone()));
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(job = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

pub fn reporter(instance: &str) -> Reporter {
    Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(instance.into()),
    }
}
