//! The TravelJob controller: one `Context`, one `reconcile` that observes
//! ([`crate::observe`]), decides ([`crate::decide`]) and applies
//! ([`crate::apply`]), one `error_policy`, and the kube-runtime wiring — the
//! runner pods' watch feeds both the controller's `owns` trigger and the pod
//! cache that reconcile reads, so there is no LIST per reconcile; the jobs'
//! watch triggers only on a new generation (a spec change), so the operator's
//! own status writes cause no reconcile.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use kubewan_crds::TravelJob;
use kubewan_crds::step::{MANAGER, runner_pods_selector};

use crate::decide::{Settings, decide};
use crate::error::{Error, Result};
use crate::metrics::{ErrorLabels, Metrics, Timer};
use crate::own_writes::OwnWrites;
use crate::pods::PodDefaults;
use crate::policy::SpecPolicy;
use crate::{apply, observe};

/// The operator's name as status patches and events carry it.
pub const FIELD_MANAGER: &str = MANAGER;

/// How long a reconcile waits for the pod cache's first full list.
const POD_CACHE_WAIT: Duration = Duration::from_secs(30);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub pod_defaults: PodDefaults,
    /// The images and volume kinds this cluster lets a job use.
    pub policy: SpecPolicy,
    /// The runner pods, kept by the watch that also triggers reconciles.
    pub pods: Store<Pod>,
    /// Statuses written that the job cache may not show yet.
    pub own_writes: OwnWrites,
}

/// Observe, decide, apply.
#[tracing::instrument(skip_all, fields(job = %job.key()))]
pub async fn reconcile(job: Arc<TravelJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = Timer::start(&ctx.metrics.reconcile_seconds);
    ctx.metrics.reconciles.inc();
    if job.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the pods (owner references).
        return Ok(Action::await_change());
    }
    // A cache that has not listed every pod yet would make running steps look new.
    let ready = tokio::time::timeout(POD_CACHE_WAIT, ctx.pods.wait_until_ready()).await;
    if !matches!(ready, Ok(Ok(()))) {
        return Err(Error::PodCacheNotReady);
    }
    let job = ctx.own_writes.newest(job);
    let pods = observe::job_pods(&job, &ctx.pods);
    let now = Timestamp::now();
    let plan = ctx.policy.admit(&job.spec);
    let decision = decide(&job, &plan, &pods, &ctx.settings, now);
    apply::apply(&job, decision, now, &ctx).await
}

pub fn error_policy(job: Arc<TravelJob>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job.key(), %error, "reconcile failed");
    ctx.metrics
        .failures
        .get_or_create(&ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    Action::requeue(error.retry_after())
}

/// Keeps the jobs-by-phase gauges in step with the controller's cache, and
/// forgets the status writes it shows.
pub async fn observe_jobs(store: Store<TravelJob>, ctx: Arc<Context>) {
    loop {
        ctx.metrics.set_jobs(
            store
                .state()
                .iter()
                .map(|j| j.status.as_ref().map(|s| s.phase).unwrap_or_default()),
        );
        ctx.own_writes.forget_seen(&store);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Runs the controller until a shutdown signal arrives. `pod_cache` fills
/// `ctx.pods` (the two halves of one `reflector::store()`).
pub async fn run(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context>,
    pod_cache: Writer<Pod>,
) {
    let (jobs, pods): (Api<TravelJob>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let pod_watch = watcher::Config::default().labels(&runner_pods_selector());
    let pod_events = watcher(pods, pod_watch)
        .default_backoff()
        .modify(trim_pod)
        .reflect(pod_cache)
        .touched_objects();
    // Every job event updates the cache (managed fields dropped, as for pods);
    // only a new generation (creation, a spec change such as suspend) triggers
    // a reconcile. Status and metadata updates do not: the pods' events, the
    // requeues the decisions ask for (retries, TTL, the resync) and
    // own_writes cover them.
    let (job_cache, job_cache_writer) = reflector::store();
    let job_events = watcher(jobs, watcher::Config::default())
        .default_backoff()
        .modify(|job| job.managed_fields_mut().clear())
        .reflect(job_cache_writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let controller = Controller::for_stream(job_events, job_cache.clone()).owns_stream(pod_events);
    tokio::spawn(observe_jobs(job_cache, ctx.clone()));
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(job = %obj.name, "reconciled"),
                // error_policy already said why; a deleted job's pods still trigger.
                Err(
                    e @ (controller::Error::ReconcilerFailed(..)
                    | controller::Error::ObjectNotFound(_)),
                ) => tracing::debug!(error = %e, "reconcile error"),
                // A failing watch (of jobs or pods) shows only here.
                Err(e) => tracing::warn!(error = %e, "controller error"),
            }
        })
        .await;
}

/// What the pod cache keeps of a runner pod: what [`observe`] reads, its
/// metadata and status. Its spec (the task, volumes, security contexts) and
/// managed fields are the bulk of it and never read back.
fn trim_pod(pod: &mut Pod) {
    pod.managed_fields_mut().clear();
    pod.spec = None;
}

pub fn reporter(instance: &str) -> Reporter {
    Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(instance.into()),
    }
}
