//! Prometheus metrics (prometheus-client) and the `/metrics`, `/healthz`,
//! `/readyz` server (axum).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kubewan_crds::JobPhase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

pub const ALL_PHASES: [JobPhase; 7] = [
    JobPhase::Pending,
    JobPhase::Prompting,
    JobPhase::Generating,
    JobPhase::Stitching,
    JobPhase::Succeeded,
    JobPhase::Failed,
    JobPhase::Suspended,
];

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub pods_created: Family<StageLabels, Counter>,
    pub pods_deleted: Counter,
    pub retries: Counter,
    pub jobs: Family<PhaseLabels, Gauge>,
    pub reconcile_seconds: Histogram,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kubewan");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let pods_created = Family::<StageLabels, Counter>::default();
        let pods_deleted = Counter::default();
        let retries = Counter::default();
        let jobs = Family::<PhaseLabels, Gauge>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "TravelJob reconciliations",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "TravelJob reconciliations that failed, by error kind",
            failures.clone(),
        );
        registry.register(
            "pods_created",
            "Runner pods created, by stage",
            pods_created.clone(),
        );
        registry.register(
            "pods_deleted",
            "Runner pods deleted (suspend, job failure)",
            pods_deleted.clone(),
        );
        registry.register(
            "pod_retries",
            "Runner pods created to retry a failed attempt",
            retries.clone(),
        );
        registry.register("traveljobs", "TravelJobs by phase", jobs.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            reconcile_seconds.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            pods_created,
            pods_deleted,
            retries,
            jobs,
            reconcile_seconds,
            leader,
        }
    }
}

impl Metrics {
    /// Sets the jobs-by-phase gauges from the phases of all known jobs.
    pub fn set_jobs(&self, phases: impl IntoIterator<Item = JobPhase>) {
        let mut counts = [0i64; ALL_PHASES.len()];
        for phase in phases {
            if let Some(i) = ALL_PHASES.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (phase, count) in ALL_PHASES.iter().zip(counts) {
            self.jobs
                .get_or_create(&PhaseLabels {
                    phase: format!("{phase:?}"),
                })
                .set(count);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Liveness and readiness, shared with the controller.
#[derive(Default)]
pub struct Health {
    /// The API server answered and the controller is set up (or, on a standby
    /// replica, waiting for the lease).
    pub ready: AtomicBool,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

/// Serves the router until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics, health)).await
}

/// The histogram timer of one reconcile.
pub struct Timer<'a> {
    start: std::time::Instant,
    histogram: &'a Histogram,
}

impl<'a> Timer<'a> {
    pub fn start(histogram: &'a Histogram) -> Self {
        Timer {
            start: std::time::Instant::now(),
            histogram,
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        let elapsed: Duration = self.start.elapsed();
        self.histogram.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_by_phase_are_counted_and_zeroed() {
        let m = Metrics::default();
        m.set_jobs([JobPhase::Generating, JobPhase::Generating, JobPhase::Failed]);
        let text = m.encode();
        assert!(
            text.contains("kubewan_traveljobs{phase=\"Generating\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kubewan_traveljobs{phase=\"Failed\"} 1"),
            "{text}"
        );
        m.set_jobs([]);
        assert!(
            m.encode()
                .contains("kubewan_traveljobs{phase=\"Generating\"} 0")
        );
    }

    #[test]
    fn counters_are_exported() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.pods_created
            .get_or_create(&StageLabels {
                stage: "segment".into(),
            })
            .inc();
        let text = m.encode();
        assert!(text.contains("kubewan_reconciles_total 1"), "{text}");
        assert!(
            text.contains("kubewan_pods_created_total{stage=\"segment\"} 1"),
            "{text}"
        );
    }
}
