//! Helpers of kubewan's end-to-end tests. They run against the real test
//! control plane (`tests/k8s/cluster.sh up`: etcd, kube-apiserver,
//! controller-manager, scheduler and the test kubelet), with the chart
//! installed and the operator running under the chart's ServiceAccount
//! (`tests/e2e/run.sh` sets all of that up). Without `KUBECONFIG` they fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use kubewan_crds::TravelJob;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Fails (never skips) when the cluster is not set up.
pub fn require_cluster() -> String {
    match std::env::var("KUBECONFIG") {
        Ok(k) if !k.is_empty() => k,
        _ => panic!(
            "KUBECONFIG is not set: these end-to-end tests need the test control plane. \
             Run `tests/e2e/run.sh` (it brings the cluster up, installs the chart, starts the \
             operator and runs these tests), or `tests/k8s/cluster.sh up` and set KUBECONFIG."
        ),
    }
}

pub async fn client() -> Client {
    require_cluster();
    Client::try_default()
        .await
        .expect("a client from KUBECONFIG (is the cluster up? tests/k8s/cluster.sh up)")
}

/// `<host root>`: where the test kubelet maps hostPath volumes (P → <root>/P).
pub fn host_root() -> PathBuf {
    PathBuf::from(std::env::var("KUBEWAN_HOST_ROOT").expect(
        "KUBEWAN_HOST_ROOT is not set (tests/e2e/run.sh sets it to the test kubelet's host root)",
    ))
}

/// The output volume of the example job, on this machine.
pub fn output_root() -> PathBuf {
    host_root().join("var/lib/kubewan/output")
}

/// Runs kubectl against the test cluster.
pub fn kubectl(args: &[&str]) -> Output {
    require_cluster();
    Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl on PATH (~/.cache/kubewan/tools/bin)")
}

/// kubectl that must succeed; returns stdout.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The example TravelJob (examples/traveljob.yaml).
pub fn example() -> TravelJob {
    let path = repo_root().join("examples/traveljob.yaml");
    let text = std::fs::read_to_string(&path).expect("examples/traveljob.yaml");
    serde_saphyr::from_str(&text).expect("the example parses as a TravelJob")
}

/// A fresh, empty namespace (an old one of the same name is deleted first).
pub async fn fresh_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await?.is_some() {
        let _ = api.delete(name, &DeleteParams::default()).await;
        wait_until(
            Duration::from_secs(120),
            &format!("namespace {name} gone"),
            || async { Ok(api.get_opt(name).await?.is_none()) },
        )
        .await?;
    }
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &ns).await?;
    // The controller-manager creates the namespace's default ServiceAccount,
    // which pods need.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), name);
    wait_until(
        Duration::from_secs(60),
        "default ServiceAccount",
        || async { Ok(sas.get_opt("default").await?.is_some()) },
    )
    .await?;
    Ok(())
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the job satisfies `pred`; returns it. On timeout the error shows
/// the job's status and its pods.
pub async fn wait_job<P>(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: P,
) -> Result<TravelJob>
where
    P: Fn(&TravelJob) -> bool,
{
    let api: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let job = api.get(name).await?;
        if pred(&job) {
            return Ok(job);
        }
        if start.elapsed() > timeout {
            let pods = job_pods(client, ns, name).await.unwrap_or_default();
            let pods: Vec<String> = pods
                .iter()
                .map(|p| {
                    format!(
                        "{} {:?}",
                        p.name_any(),
                        p.status.as_ref().and_then(|s| s.phase.clone())
                    )
                })
                .collect();
            bail!(
                "timed out after {timeout:?} waiting for TravelJob {ns}/{name} to be {what}; status: {}; pods: {pods:?}",
                serde_json::to_string_pretty(&job.status).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The pods of a job (by the operator's job label).
pub async fn job_pods(client: &Client, ns: &str, job: &str) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default().labels(&format!("kubewan.dev/job={job}")))
        .await?
        .items)
}

/// The events about one object.
pub async fn events_of(client: &Client, ns: &str, name: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect())
}

/// Controls the operator process that tests/e2e/run.sh started
/// (tests/e2e/operator.sh start|stop|kill|restart|status).
pub fn operator(action: &str) -> Result<String> {
    operator_with(action, &[])
}

/// [`operator`] with extra environment, e.g. `KUBEWAN_E2E_INSTANCE` and
/// `KUBEWAN_E2E_METRICS_ADDR` for a second replica.
pub fn operator_with(action: &str, env: &[(&str, &str)]) -> Result<String> {
    let script = repo_root().join("tests/e2e/operator.sh");
    let out = Command::new(&script)
        .arg(action)
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "operator.sh {action} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GET http://<KUBEWAN_E2E_METRICS_ADDR><path> (the local operator's server).
pub async fn http_get(path: &str) -> Result<(u16, String)> {
    let addr =
        std::env::var("KUBEWAN_E2E_METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:18080".into());
    http_get_at(&addr, path).await
}

/// GET http://<addr><path>.
pub async fn http_get_at(addr: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the operator at {addr}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("an HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Checks that `path` is a playable MP4: ffprobe (when installed) must find an
/// H.264 video stream; returns its frame count when known.
pub fn check_mp4(path: &Path) -> Result<Option<u64>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 12 || &bytes[4..8] != b"ftyp" {
        bail!("{} is not an MP4 (no ftyp box)", path.display());
    }
    if !bytes.windows(4).any(|w| w == b"moov") {
        bail!("{} has no moov box", path.display());
    }
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=codec_name,nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output();
    match probe {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !out.status.success() || !text.starts_with("h264") {
                bail!(
                    "ffprobe cannot play {}: {text} {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(text.split(',').nth(1).and_then(|n| n.trim().parse().ok()))
        }
        Err(_) => {
            eprintln!("note: ffprobe is not installed; checked the MP4 boxes only");
            Ok(None)
        }
    }
}

/// Creates a TravelJob in `ns`.
pub async fn create_job(client: &Client, ns: &str, job: &TravelJob) -> Result<TravelJob> {
    let api: Api<TravelJob> = Api::namespaced(client.clone(), ns);
    let mut job = job.clone();
    job.metadata.namespace = Some(ns.into());
    job.metadata.resource_version = None;
    job.metadata.uid = None;
    job.status = None;
    Ok(api.create(&PostParams::default(), &job).await?)
}
