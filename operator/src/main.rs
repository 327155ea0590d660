//! `kubewan-operator`: the TravelJob controller, its metrics and health server,
//! and leader election.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Recorder;
use kube::runtime::reflector;
use kube::{Api, Client, Config};
use kubewan_operator::controller::{self, Context};
use kubewan_operator::decide::Settings;
use kubewan_operator::leader::{LeaderElector, LeaseSettings};
use kubewan_operator::metrics::{self, Health, Metrics};
use kubewan_operator::pods::PodDefaults;
use kubewan_operator::policy::{SpecPolicy, VolumeKind};
use kubewan_operator::step::Backoff;
use kubewan_operator::telemetry::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "kubewan's Kubernetes operator: runs TravelJobs as runner pods"
)]
struct Args {
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "KUBEWAN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Take a coordination.k8s.io Lease before reconciling (run two replicas safely).
    #[arg(long, env = "KUBEWAN_LEADER_ELECT")]
    leader_elect: bool,

    /// Namespace of the leader Lease (defaults to the pod's namespace, then "default").
    #[arg(long, env = "KUBEWAN_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    #[arg(long, env = "KUBEWAN_LEASE_NAME", default_value = "kubewan-leader")]
    lease_name: String,

    #[arg(long, env = "KUBEWAN_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// This replica's identity in the Lease (defaults to POD_NAME, then hostname-pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KUBEWAN_WATCH_NAMESPACE")]
    namespace: Option<String>,

    /// Runner image for TravelJobs that do not set spec.runner.image.
    #[arg(
        long,
        env = "KUBEWAN_RUNNER_IMAGE",
        default_value = "ghcr.io/kubewan/kubewan-runner:latest"
    )]
    runner_image: String,

    /// Images a TravelJob's spec.runner.image may name, besides the
    /// repository of --runner-image (always allowed): a repository (any tag
    /// or digest of it, e.g. registry.example/ml/runner) or a prefix ending in
    /// '/' (every repository under it, e.g. registry.example/ml/). Repeatable
    /// or comma-separated.
    #[arg(long, env = "KUBEWAN_ALLOWED_IMAGES", value_delimiter = ',')]
    allowed_images: Vec<String>,

    /// Volume kinds a TravelJob may mount (persistentVolumeClaim, nfs,
    /// hostPath). Repeatable or comma-separated.
    #[arg(
        long,
        env = "KUBEWAN_ALLOWED_VOLUME_KINDS",
        value_delimiter = ',',
        default_value = "persistentVolumeClaim"
    )]
    allowed_volume_kinds: Vec<VolumeKind>,

    /// imagePullPolicy of runner pods that do not set their own.
    #[arg(long, env = "KUBEWAN_RUNNER_IMAGE_PULL_POLICY")]
    runner_image_pull_policy: Option<String>,

    /// First retry delay of a failed pod, in seconds; doubles per failure.
    #[arg(long, env = "KUBEWAN_BACKOFF_BASE_SECONDS", default_value_t = 10.0)]
    backoff_base_seconds: f64,

    /// Longest retry delay, in seconds.
    #[arg(long, env = "KUBEWAN_BACKOFF_MAX_SECONDS", default_value_t = 360.0)]
    backoff_max_seconds: f64,

    /// How long the kubelet may fail to start a runner pod's container (image
    /// pull, missing configuration) before the attempt counts as failed, in seconds.
    #[arg(long, env = "KUBEWAN_START_TIMEOUT_SECONDS", default_value_t = 300)]
    start_timeout_seconds: u64,

    /// How often an active job is re-examined without any event, in seconds.
    #[arg(long, env = "KUBEWAN_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,

    /// Act as this user (client impersonation, like kubectl --as), e.g. to run
    /// under a ServiceAccount's RBAC from outside the cluster.
    #[arg(long = "as", env = "KUBEWAN_IMPERSONATE")]
    impersonate: Option<String>,

    /// Groups to impersonate along with --as (repeatable).
    #[arg(
        long = "as-group",
        env = "KUBEWAN_IMPERSONATE_GROUPS",
        value_delimiter = ','
    )]
    impersonate_groups: Vec<String>,

    #[arg(long, env = "KUBEWAN_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "kubewan".into());
    format!("{host}-{}", std::process::id())
}

fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format);

    let policy = SpecPolicy::new(
        &args.runner_image,
        &args.allowed_images,
        &args.allowed_volume_kinds,
    )
    .map_err(|why| anyhow!("--runner-image / --allowed-images: {why}"))?;
    tracing::info!(?policy, "what TravelJobs may use");

    let mut config = Config::infer().await.context("kubeconfig")?;
    if let Some(user) = &args.impersonate {
        tracing::info!(%user, groups = ?args.impersonate_groups, "impersonating");
        config.auth_info.impersonate = Some(user.clone());
        if !args.impersonate_groups.is_empty() {
            config.auth_info.impersonate_groups = Some(args.impersonate_groups.clone());
        }
    }
    let client = Client::try_from(config).context("client")?;
    let version = client
        .apiserver_version()
        .await
        .context("API server unreachable")?;
    tracing::info!(version = %version.git_version, "connected to the API server");

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let server = tokio::spawn(metrics::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let settings = Settings {
        backoff: Backoff {
            base: Duration::from_secs_f64(args.backoff_base_seconds.max(0.0)),
            max: Duration::from_secs_f64(args.backoff_max_seconds.max(0.0)),
        },
        start_timeout: Duration::from_secs(args.start_timeout_seconds),
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    // The runner pods' watch cache: read by reconcile, filled by the controller's pod watch.
    let (pods, pod_cache) = reflector::store();
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), controller::reporter(&identity)),
        metrics: metrics.clone(),
        settings,
        pod_defaults: PodDefaults {
            runner_image: args.runner_image.clone(),
            image_pull_policy: args.runner_image_pull_policy.clone(),
        },
        policy,
        pods,
        own_writes: Default::default(),
    });

    let mut elector = None;
    if args.leader_elect {
        let ns = args
            .lease_namespace
            .clone()
            .or_else(own_namespace)
            .unwrap_or_else(|| "default".into());
        let duration = Duration::from_secs(args.lease_duration_seconds.max(3));
        let mut e = LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &ns),
            LeaseSettings {
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration,
                retry: duration / 5,
                renew_deadline: duration * 2 / 3,
            },
        );
        // A standby replica is healthy and ready; it just does not reconcile.
        health.ready.store(true, Ordering::Relaxed);
        tracing::info!(%identity, lease = %format!("{ns}/{}", args.lease_name), "waiting for the leader lease");
        tokio::select! {
            r = e.acquire() => r.context("taking the leader lease")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm() => return Ok(()),
        }
        tracing::info!(%identity, "leading");
        elector = Some(e);
    }
    metrics.leader.set(1);
    health.ready.store(true, Ordering::Relaxed);

    let run = controller::run(client.clone(), args.namespace.clone(), ctx, pod_cache);
    let outcome: anyhow::Result<()> = match elector.as_mut() {
        Some(e) => {
            tokio::select! {
                _ = run => Ok(()),
                lost = e.keep() => Err(lost.into()),
            }
        }
        None => tokio::select! {
            _ = run => Ok(()),
            r = server => Err(anyhow!("metrics server stopped: {r:?}")),
        },
    };
    metrics.leader.set(0);
    if let Some(e) = &elector
        && outcome.is_ok()
        && let Err(err) = e.release().await
    {
        tracing::warn!(error = %err, "could not release the lease");
    }
    outcome?;
    tracing::info!("shut down");
    Ok(())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
