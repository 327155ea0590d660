//! Apply: carries a [`Decision`] out against the API server — deletes and
//! creates pods (a refused creation folded back by [`decide::pod_not_created`]
//! / [`decide::pod_refused`]), writes the status in one patch when it changed
//! (remembered until the job cache shows it), publishes the events, and
//! deletes a job whose TTL elapsed.

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kubewan_crds::TravelJob;
use kubewan_crds::report::shorten;
use kubewan_crds::status::TravelJobStatus;
use serde_json::json;

use crate::controller::{Context, FIELD_MANAGER};
use crate::decide::{self, Decision};
use crate::error::{Error, Result};
use crate::events::EventSpec;
use crate::metrics::StageLabels;
use crate::pods::build_pod;

/// Carries `d`, decided at `now`, out for `job`; returns when to look again.
pub async fn apply(
    job: &TravelJob,
    mut d: Decision,
    now: Timestamp,
    ctx: &Context,
) -> Result<Action> {
    let ns = job
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Api<TravelJob> = Api::namespaced(ctx.client.clone(), &ns);
    delete_pods(&pods, &d.delete, ctx).await?;
    create_pods(job, &pods, &mut d, now, ctx).await?;
    if job.status.as_ref() != Some(&d.status) {
        let written = patch_status(job, &jobs, &d.status).await?;
        if let Some(status) = &written.status {
            ctx.own_writes.record(job, status);
        }
    }
    publish_events(job, &d.events, ctx).await;
    if d.delete_job {
        delete_job(job, &jobs).await?;
        return Ok(Action::await_change());
    }
    Ok(d.requeue.map_or_else(Action::await_change, Action::requeue))
}

fn is_status(e: &kube::Error, codes: &[u16]) -> bool {
    matches!(e, kube::Error::Api(s) if codes.contains(&s.code))
}

async fn delete_pods(api: &Api<Pod>, names: &[String], ctx: &Context) -> Result<()> {
    for pod in names {
        match api.delete(pod, &DeleteParams::background()).await {
            Ok(_) => {
                ctx.metrics.pods_deleted.inc();
                tracing::info!(%pod, "deleted pod");
            }
            Err(e) if is_status(&e, &[404]) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates the decided pods in order, stopping at the first one the API
/// server refuses or cannot create; the pods after it wait for the next
/// reconcile.
async fn create_pods(
    job: &TravelJob,
    api: &Api<Pod>,
    d: &mut Decision,
    now: Timestamp,
    ctx: &Context,
) -> Result<()> {
    let mut decided = std::mem::take(&mut d.create).into_iter();
    for new in decided.by_ref() {
        let pod = build_pod(job, &new, &ctx.pod_defaults)?;
        let (step, attempt) = (new.attempt.step, new.attempt.attempt);
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                let stage = step.stage().as_str().into();
                ctx.metrics
                    .pods_created
                    .get_or_create(&StageLabels { stage })
                    .inc();
                if attempt > 1 {
                    ctx.metrics.retries.inc();
                }
                tracing::info!(pod = %new.name, %step, attempt, "created pod");
            }
            // Deterministic names: the pod is already there (a stale cache
            // or a restart); never a duplicate.
            Err(e) if is_status(&e, &[409]) => {
                tracing::debug!(pod = %new.name, "pod already exists");
            }
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                decide::pod_refused(job, d, &new, &s.message, now);
                break;
            }
            // Anything else may pass (a quota, an admission webhook, the
            // server busy): written to the status and retried, never a
            // reconcile that ends before the status says why.
            Err(e) => {
                tracing::warn!(pod = %new.name, error = %e, "could not create pod");
                let why = match &e {
                    kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
                    other => other.to_string(),
                };
                decide::pod_not_created(job, d, &new, &why);
                break;
            }
        }
    }
    for untried in decided {
        decide::pod_not_tried(d, &untried);
    }
    Ok(())
}

/// One server-side apply of the whole status; returns the job as the server
/// stored it (times to the second), which is what the job cache will show.
async fn patch_status(
    job: &TravelJob,
    jobs: &Api<TravelJob>,
    status: &TravelJobStatus,
) -> Result<TravelJob> {
    let patch = json!({
        "apiVersion": TravelJob::api_version(&()),
        "kind": TravelJob::kind(&()),
        "status": status,
    });
    Ok(jobs
        .patch_status(
            &job.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?)
}

/// Publishes the events; one that fails is logged, never fails the reconcile.
async fn publish_events(job: &TravelJob, events: &[EventSpec], ctx: &Context) {
    let reference = job.object_ref(&());
    for ev in events {
        let event = Event {
            type_: if ev.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: ev.reason.clone(),
            note: Some(shorten(&ev.note, 1000)),
            action: ev.action.clone(),
            secondary: ev.pod.as_ref().map(|pod| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.clone()),
                namespace: job.namespace(),
                ..Default::default()
            }),
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason = %ev.reason, "could not publish event");
        }
    }
}

async fn delete_job(job: &TravelJob, jobs: &Api<TravelJob>) -> Result<()> {
    tracing::info!("ttlSecondsAfterFinished elapsed: deleting the TravelJob");
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match jobs.delete(&job.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, &[404]) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
