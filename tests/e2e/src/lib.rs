//! Helpers of kubewan's end-to-end tests. They run against the test cluster
//! (`tests/k8s/cluster.sh up`: etcd, kube-apiserver, controller-manager,
//! scheduler, and a kubelet over containerd), with the images loaded, the
//! chart installed and its operator running in-cluster (`tests/e2e/run.sh`
//! sets all of that up). Without `KUBECONFIG` they fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use kubewan_crds::step::job_selector;
use kubewan_crds::{TravelJob, TravelJobStatus};

pub mod pipeline;
pub use pipeline::*;

/// The repository root: the workspace (with its Cargo.lock) above the test
/// binary's package, found at run time (cargo sets CARGO_MANIFEST_DIR for
/// test binaries), so a build cached from a checkout elsewhere never reads
/// that checkout.
pub fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("CARGO_MANIFEST_DIR is not set: run these tests with cargo test");
    Path::new(&manifest_dir)
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .expect("a workspace with a Cargo.lock above CARGO_MANIFEST_DIR")
        .to_path_buf()
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

/// `<host root>`: the node's `/var/lib/kubewan` is `<host root>/var/lib/kubewan`
/// (hostPath volumes there, e.g. the example job's).
pub fn host_root() -> PathBuf {
    PathBuf::from(std::env::var("KUBEWAN_HOST_ROOT").expect(
        "KUBEWAN_HOST_ROOT is not set (tests/e2e/run.sh sets it: eval \"$(tests/k8s/cluster.sh env)\")",
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
        .list(&ListParams::default().labels(&job_selector(job)))
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

/// Runs the repository's script `rel` with `args`; returns its stdout.
fn run_script(rel: &str, args: &[&str]) -> Result<String> {
    let script = repo_root().join(rel);
    let out = Command::new(&script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{rel} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `tests/e2e/operator.sh ARGS` (the in-cluster operator's controls:
/// status, leader, kill, scale N); returns its stdout.
pub fn operator(args: &[&str]) -> Result<String> {
    run_script("tests/e2e/operator.sh", args)
}

/// The test node's kubelet stopped (SIGSTOP, `cluster.sh pause-node`) until
/// this guard is dropped: the node answers nothing (no pod starts, no status,
/// no deletion is confirmed) while its containers run on, which is what the
/// control plane sees of a lost node.
pub struct PausedNode(());

impl PausedNode {
    pub fn pause() -> Result<PausedNode> {
        run_script("tests/k8s/cluster.sh", &["pause-node"])?;
        Ok(PausedNode(()))
    }
}

impl Drop for PausedNode {
    fn drop(&mut self) {
        if let Err(e) = run_script("tests/k8s/cluster.sh", &["resume-node"]) {
            eprintln!("resuming the test node failed: {e:#}");
        }
    }
}

/// The namespace and name prefix of the chart's release (tests/e2e/run.sh).
pub const RELEASE_NS: &str = "kubewan-system";

/// GET `path` (e.g. `/metrics`) of the operator's metrics Service, through the
/// API server's service proxy: the Service must route to a Ready operator pod.
pub fn operator_get(path: &str) -> Result<String> {
    raw_get(&format!(
        "/api/v1/namespaces/{RELEASE_NS}/services/kubewan-metrics:metrics/proxy{path}"
    ))
}

/// The chart's default `metrics.port`.
const METRICS_PORT: u16 = 8080;

/// GET `path` of one operator pod's metrics port, through the API server's pod
/// proxy (which, in v1.20, takes a port number, not a name).
pub fn operator_pod_get(pod: &str, path: &str) -> Result<String> {
    raw_get(&format!(
        "/api/v1/namespaces/{RELEASE_NS}/pods/{pod}:{METRICS_PORT}/proxy{path}"
    ))
}

/// `kubectl get --raw PATH`: the body of a successful GET, an error otherwise.
fn raw_get(path: &str) -> Result<String> {
    let out = kubectl(&["get", "--raw", path]);
    if !out.status.success() {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Asserts that the node runs `pod`'s container as the restricted Pod
/// Security Standard asks, read from the OCI spec containerd holds: the
/// runner's non-root user, a read-only root, no privilege escalation, no
/// capabilities, the RuntimeDefault seccomp profile. Returns that spec.
pub fn assert_confined(pod: &Pod) -> serde_json::Value {
    let oci = runtime_spec(pod).unwrap();
    let name = pod.name_any();
    assert_eq!(oci["process"]["user"]["uid"], 65532, "{name}");
    assert_eq!(oci["process"]["user"]["gid"], 65532, "{name}");
    assert_eq!(oci["root"]["readonly"], true, "{name}: read-only root");
    assert_eq!(oci["process"]["noNewPrivileges"], true, "{name}");
    let seccomp = &oci["linux"]["seccomp"];
    assert_eq!(
        seccomp["defaultAction"], "SCMP_ACT_ERRNO",
        "{name}: RuntimeDefault seccomp: {seccomp}"
    );
    let caps = &oci["process"]["capabilities"];
    for set in ["bounding", "effective", "permitted"] {
        assert!(
            caps[set].as_array().is_none_or(|c| c.is_empty()),
            "{name}: {set} capabilities {}",
            caps[set]
        );
    }
    oci
}

/// The OCI runtime spec that the node's containerd holds for the (first)
/// container of `pod` (`ctr containers info`): what the runtime really applied
/// (user, read-only root, mounts, capabilities), not what the pod asked for.
pub fn runtime_spec(pod: &Pod) -> Result<serde_json::Value> {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .with_context(|| format!("pod {} has no container id", pod.name_any()))?;
    let address = std::env::var("KUBEWAN_CONTAINERD_ADDRESS")
        .context("KUBEWAN_CONTAINERD_ADDRESS is not set (tests/k8s/cluster.sh env)")?;
    let out = Command::new("ctr")
        .args([
            "--address",
            &address,
            "--namespace",
            "k8s.io",
            "containers",
            "info",
        ])
        .arg(id.trim_start_matches("containerd://"))
        .output()
        .context("running ctr (containerd)")?;
    if !out.status.success() {
        bail!(
            "ctr containers info {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(info["Spec"].clone())
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

/// The model folders and keyframes of the test node (`/var/lib/kubewan/…`
/// under the host root), for tests that add their own.
pub fn node_path(rel: &str) -> PathBuf {
    host_root().join("var/lib/kubewan").join(rel)
}

/// Waits until the job finished (Succeeded or Failed); returns it.
pub async fn wait_finished(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<TravelJob> {
    wait_job(client, ns, name, timeout, "finished", |j| {
        j.status.as_ref().is_some_and(|s| s.phase.is_finished())
    })
    .await
}

/// The example job as a preview (no VLM, no model): segment 0, segment 1,
/// then the stitch, each pod done in seconds. Named `name`.
pub fn preview_job(name: &str) -> TravelJob {
    let mut job = example();
    job.metadata.name = Some(name.into());
    job.spec.enhance_prompt.enabled = false;
    job.spec.model.name = kubewan_crds::PREVIEW_MODEL.into();
    job
}

/// Runs `job` in a fresh namespace `ns` until it finished, asserts it failed,
/// and returns its status and message.
pub async fn run_to_failure(
    client: &Client,
    ns: &str,
    job: &TravelJob,
) -> (TravelJobStatus, String) {
    fresh_namespace(client, ns).await.unwrap();
    create_job(client, ns, job).await.unwrap();
    wait_failed(client, ns, &job.name_any(), Duration::from_secs(300)).await
}

/// Waits until the job finished, asserts it failed, and returns its status
/// and message (printed).
pub async fn wait_failed(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> (TravelJobStatus, String) {
    let done = wait_finished(client, ns, name, timeout).await.unwrap();
    let status = done.status.unwrap_or_default();
    let message = status.message.clone().unwrap_or_default();
    println!("message: {message}");
    assert_eq!(status.phase, kubewan_crds::JobPhase::Failed, "{message}");
    (status, message)
}

/// Waits until the job finished and asserts it succeeded (the status says
/// why not); returns it.
pub async fn wait_succeeded(client: &Client, ns: &str, name: &str, timeout: Duration) -> TravelJob {
    let job = wait_finished(client, ns, name, timeout).await.unwrap();
    let status = job.status.clone().unwrap_or_default();
    assert_eq!(
        status.phase,
        kubewan_crds::JobPhase::Succeeded,
        "{ns}/{name} failed: {}",
        serde_json::to_string_pretty(&status).unwrap_or_default()
    );
    job
}

/// `kubectl wait tj/NAME --for=condition=CONDITION` (up to 300 s), as a user
/// waits on a job.
pub fn kubectl_wait(ns: &str, name: &str, condition: &str) {
    kubectl_ok(&[
        "wait",
        "-n",
        ns,
        &format!("tj/{name}"),
        &format!("--for=condition={condition}"),
        "--timeout=300s",
    ]);
}
