//! Running one pod as a local process, like a kubelet with a very thin runtime.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use kubewan_crds::task::{CKPTS_MOUNT, INPUTS_MOUNT, OUTPUT_MOUNT};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::status::{self, ContainerReport, ContainerState, Terminated};

/// Environment variables through which a local process finds what would be
/// mounted in a container.
pub const MOUNT_ENV: [(&str, &str); 3] = [
    (CKPTS_MOUNT, "KUBEWAN_CKPTS"),
    (INPUTS_MOUNT, "KUBEWAN_INPUTS"),
    (OUTPUT_MOUNT, "KUBEWAN_OUTPUT"),
];
pub const TERMINATION_LOG_ENV: &str = "KUBEWAN_TERMINATION_LOG";
/// A mount at /tmp (an emptyDir under a read-only root filesystem) becomes TMPDIR.
pub const TMP_MOUNT: &str = "/tmp";

/// Kills the process group an earlier agent started for this pod, when it is
/// still running. It is recognised by its pid file and by the termination-log
/// path in its environment (so a recycled pid is never hit).
pub fn kill_orphan(settings: &Settings, pod: &Pod) -> Option<i32> {
    let dir = pod_dir(settings, pod);
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let want = format!(
        "{TERMINATION_LOG_ENV}={}",
        dir.join("termination-log").display()
    );
    if !environ.split(|b| *b == 0).any(|e| e == want.as_bytes()) {
        return None;
    }
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = std::fs::remove_file(dir.join("pid"));
    Some(pid)
}

/// Cap on the grace period before SIGKILL (test clusters need to be quick).
const MAX_GRACE: Duration = Duration::from_secs(30);

pub struct Settings {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub host_root: PathBuf,
    pub bin_dir: PathBuf,
    pub default_command: String,
    pub pass_env: Vec<String>,
}

/// Why a running pod is being stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Run,
    /// The pod was deleted (or got a deletionTimestamp).
    Delete,
    /// The agent is shutting down.
    Shutdown,
}

/// What a pod's process ended with.
enum Outcome {
    Exited(std::process::ExitStatus),
    Deadline(std::process::ExitStatus),
    Stopped(Stop, std::process::ExitStatus),
}

/// A pod ready to run: the resolved command line, environment and folders.
struct Prepared {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    dir: PathBuf,
    log: PathBuf,
    termination_log: PathBuf,
    fallback_to_logs: bool,
}

pub fn pod_dir(settings: &Settings, pod: &Pod) -> PathBuf {
    settings.state_dir.join("pods").join(format!(
        "{}_{}_{}",
        pod.namespace().unwrap_or_default(),
        pod.name_any(),
        pod.uid().unwrap_or_default()
    ))
}

/// `$(VAR)` expansion as the kubelet does it for command, args and env values;
/// `$$(VAR)` escapes; unknown references stay as written.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some(v) = env.get(name) {
                        out.push_str(v);
                        i += 3 + end;
                        continue;
                    }
                }
            }
        }
        let ch = s[i..].chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// command[0] looked up in the bin dir first (by file name), then as written
/// when it is a path, then on PATH.
pub fn resolve_program(cmd0: &str, bin_dir: &Path, path_var: &str) -> Result<PathBuf> {
    let base = Path::new(cmd0)
        .file_name()
        .ok_or_else(|| anyhow!("empty command"))?;
    let candidate = bin_dir.join(base);
    if is_executable(&candidate) {
        return Ok(candidate);
    }
    if cmd0.contains('/') {
        let p = PathBuf::from(cmd0);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    for dir in std::env::split_paths(path_var) {
        let p = dir.join(base);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    bail!(
        "executable {cmd0:?} not found in {} nor on PATH",
        bin_dir.display()
    )
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

async fn env_value(client: &Client, pod: &Pod, var: &EnvVar) -> Result<Option<String>> {
    if let Some(v) = &var.value {
        return Ok(Some(v.clone()));
    }
    let Some(from) = &var.value_from else {
        return Ok(Some(String::new()));
    };
    let ns = pod.namespace().unwrap_or_default();
    if let Some(f) = &from.field_ref {
        let path = f.field_path.as_str();
        let meta = &pod.metadata;
        let v = match path {
            "metadata.name" => meta.name.clone(),
            "metadata.namespace" => meta.namespace.clone(),
            "metadata.uid" => meta.uid.clone(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone()),
            "status.podIP" | "status.hostIP" => Some("127.0.0.1".into()),
            _ => {
                let label = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
                    path.strip_prefix(prefix)
                        .and_then(|r| r.strip_suffix("']"))
                        .map(|k| map.as_ref().and_then(|m| m.get(k).cloned()))
                };
                if let Some(v) = label("metadata.labels['", &meta.labels) {
                    v
                } else if let Some(v) = label("metadata.annotations['", &meta.annotations) {
                    v
                } else {
                    bail!("env {}: fieldRef {path} is not supported", var.name)
                }
            }
        };
        return Ok(Some(v.unwrap_or_default()));
    }
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional.unwrap_or(false);
        let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .get_opt(&r.name)
            .await?;
        let v = cm.and_then(|c| c.data.and_then(|d| d.get(&r.key).cloned()));
        return match v {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => bail!(
                "env {}: configmap key {}/{} not found",
                var.name,
                r.name,
                r.key
            ),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional.unwrap_or(false);
        let s = Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt(&r.name)
            .await?;
        let v = s.and_then(|s| s.data.and_then(|d| d.get(&r.key).cloned()));
        return match v {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v.0).into_owned())),
            None if optional => Ok(None),
            None => bail!(
                "env {}: secret key {}/{} not found",
                var.name,
                r.name,
                r.key
            ),
        };
    }
    bail!("env {}: this kind of valueFrom is not supported", var.name)
}

/// Writes a ConfigMap's or Secret's keys as files (a configMap/secret volume).
fn write_files(dir: &Path, files: BTreeMap<String, Vec<u8>>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (k, v) in files {
        std::fs::write(dir.join(&k), v).with_context(|| format!("writing {k}"))?;
    }
    Ok(())
}

async fn prepare(client: &Client, settings: &Settings, pod: &Pod, dir: &Path) -> Result<Prepared> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| anyhow!("pod has no spec"))?;
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        bail!("kubewan-node-agent does not run init containers");
    }
    let [container]: &[Container; 1] = spec.containers.as_slice().try_into().map_err(|_| {
        anyhow!(
            "kubewan-node-agent runs pods with exactly one container, this one has {}",
            spec.containers.len()
        )
    })?;
    let ns = pod.namespace().unwrap_or_default();

    // Volumes → local folders.
    let mut volumes: HashMap<String, PathBuf> = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let path = if let Some(hp) = &v.host_path {
            let p = settings.host_root.join(hp.path.trim_start_matches('/'));
            match hp.type_.as_deref() {
                Some("File") | Some("FileOrCreate") | Some("Socket") | Some("CharDevice")
                | Some("BlockDevice") => {
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                }
                _ => std::fs::create_dir_all(&p)
                    .with_context(|| format!("creating hostPath folder {}", p.display()))?,
            }
            p
        } else if let Some(pvc) = &v.persistent_volume_claim {
            let p = settings.host_root.join("pvc").join(&pvc.claim_name);
            std::fs::create_dir_all(&p)
                .with_context(|| format!("creating PVC folder {}", p.display()))?;
            p
        } else if v.empty_dir.is_some() {
            let p = dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&p)?;
            p
        } else if let Some(cmv) = &v.config_map {
            let p = dir.join("volumes").join(&v.name);
            let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get_opt(&cmv.name)
                .await?;
            match cm {
                Some(cm) => {
                    let mut files: BTreeMap<String, Vec<u8>> = cm
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    files.extend(
                        cm.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    );
                    write_files(&p, files)?
                }
                None if cmv.optional.unwrap_or(false) => std::fs::create_dir_all(&p)?,
                None => bail!("volume {}: configmap {} not found", v.name, cmv.name),
            }
            p
        } else if let Some(sv) = &v.secret {
            let p = dir.join("volumes").join(&v.name);
            let name = sv.secret_name.clone().unwrap_or_default();
            let s = Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await?;
            match s {
                Some(s) => write_files(
                    &p,
                    s.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect(),
                )?,
                None if sv.optional.unwrap_or(false) => std::fs::create_dir_all(&p)?,
                None => bail!("volume {}: secret {name} not found", v.name),
            }
            p
        } else {
            bail!(
                "volume {}: only hostPath, persistentVolumeClaim, emptyDir, configMap and secret volumes are supported",
                v.name
            );
        };
        volumes.insert(v.name.clone(), path);
    }

    let termination_log = dir.join("termination-log");
    let log = dir.join("container.log");
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;

    // Environment: a clean one, as in a container.
    let path_var = format!(
        "{}:{}",
        settings.bin_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
    );
    let mut env = BTreeMap::new();
    for name in &settings.pass_env {
        if let Ok(v) = std::env::var(name) {
            env.insert(name.clone(), v);
        }
    }
    env.insert("PATH".into(), path_var.clone());
    env.insert("HOME".into(), work.display().to_string());
    env.insert("HOSTNAME".into(), pod.name_any());
    env.insert(
        TERMINATION_LOG_ENV.into(),
        termination_log.display().to_string(),
    );
    for m in container.volume_mounts.iter().flatten() {
        let base = volumes
            .get(&m.name)
            .ok_or_else(|| anyhow!("volumeMount {}: no volume of that name", m.name))?;
        let local = match m.sub_path.as_deref() {
            Some(sp) if !sp.is_empty() => {
                if sp.split('/').any(|c| c == "..") || sp.starts_with('/') {
                    bail!("volumeMount {}: subPath {sp:?} escapes the volume", m.name);
                }
                let p = base.join(sp);
                std::fs::create_dir_all(&p)?;
                p
            }
            _ => base.clone(),
        };
        let mount_path = m.mount_path.trim_end_matches('/');
        if let Some((_, var)) = MOUNT_ENV.iter().find(|(p, _)| *p == mount_path) {
            env.insert((*var).into(), local.display().to_string());
        }
        if mount_path == TMP_MOUNT {
            env.insert("TMPDIR".into(), local.display().to_string());
        }
    }
    for m in container.env_from.iter().flatten() {
        let prefix = m.prefix.clone().unwrap_or_default();
        if let Some(r) = &m.config_map_ref {
            match Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get_opt(&r.name)
                .await?
            {
                Some(cm) => {
                    for (k, v) in cm.data.unwrap_or_default() {
                        env.insert(format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => bail!("envFrom: configmap {} not found", r.name),
            }
        }
        if let Some(r) = &m.secret_ref {
            match Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&r.name)
                .await?
            {
                Some(s) => {
                    for (k, v) in s.data.unwrap_or_default() {
                        env.insert(format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into());
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => bail!("envFrom: secret {} not found", r.name),
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(v) = env_value(client, pod, var).await? {
            let v = expand(&v, &env);
            env.insert(var.name.clone(), v);
        }
    }

    // Command line. Without `command`, the image's entrypoint is unknown here:
    // the agent stands in with --default-command (kubewan-runner).
    let mut argv: Vec<String> = match &container.command {
        Some(c) if !c.is_empty() => c.clone(),
        _ => vec![settings.default_command.clone()],
    };
    argv.extend(container.args.iter().flatten().cloned());
    let argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
    let program = resolve_program(&argv[0], &settings.bin_dir, &path_var)?;

    Ok(Prepared {
        program,
        args: argv[1..].to_vec(),
        env,
        dir: work,
        log,
        termination_log,
        fallback_to_logs: container.termination_message_policy.as_deref()
            == Some("FallbackToLogsOnError"),
    })
}

/// SIGTERM to the process group, SIGKILL after the grace period.
async fn stop_process(
    child: &mut tokio::process::Child,
    pgid: i32,
    grace: Duration,
) -> std::process::ExitStatus {
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(st)) => {
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            st
        }
        _ => {
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            child
                .wait()
                .await
                .unwrap_or_else(|_| std::process::ExitStatus::from_raw(libc::SIGKILL))
        }
    }
}

fn exit_code(st: &std::process::ExitStatus) -> (i32, Option<i32>) {
    match (st.code(), st.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(s)),
        _ => (255, None),
    }
}

fn grace_period(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30)
        .max(0) as u64;
    Duration::from_secs(secs)
        .min(MAX_GRACE)
        .max(Duration::from_secs(1))
}

pub struct PodCtx {
    pub client: Client,
    pub settings: Arc<Settings>,
}

impl PodCtx {
    fn api(&self, pod: &Pod) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default())
    }

    async fn patch(&self, pod: &Pod, patch: serde_json::Value) {
        let name = pod.name_any();
        let r = self
            .api(pod)
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
            .await;
        if let Err(e) = r {
            warn!(pod = %name, error = %e, "writing pod status failed");
        }
    }

    /// Deletes the pod with grace 0, as a kubelet confirms a graceful deletion.
    pub async fn confirm_delete(&self, pod: &Pod) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api(pod).delete(&pod.name_any(), &dp).await {
            Ok(_) => info!(pod = %pod.name_any(), "deleted (grace 0)"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => warn!(pod = %pod.name_any(), error = %e, "deleting pod failed"),
        }
    }

    /// Marks a pod Failed without running it (it cannot be run here).
    pub async fn fail_unstarted(&self, pod: &Pod, reason: &str, message: &str) {
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .cloned()
            .unwrap_or_default();
        let start = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(status::now);
        let report = ContainerReport {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            container_id: None,
            restart_count: 0,
            state: ContainerState::Waiting {
                reason: reason.into(),
                message: Some(message.into()),
            },
            last_state: None,
        };
        warn!(pod = %pod.name_any(), reason, message, "pod failed before it started");
        self.patch(
            pod,
            status::pod_status_patch("Failed", &start, &report, Some(reason), Some(message)),
        )
        .await;
    }

    /// Runs the pod to completion (or until it is deleted, or the agent stops).
    pub async fn run(self: Arc<Self>, pod: Pod, mut stop: watch::Receiver<Stop>) {
        let name = pod.name_any();
        let settings = &self.settings;
        let dir = pod_dir(settings, &pod);
        let spec = pod.spec.clone().unwrap_or_default();
        let container = spec.containers.first().cloned().unwrap_or_default();
        let image = container.image.clone().unwrap_or_default();
        let start_time = status::now();
        let started = Instant::now();
        let deadline = spec
            .active_deadline_seconds
            .map(|s| started + Duration::from_secs(s.max(0) as u64));
        let restart_policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());

        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.fail_unstarted(
                &pod,
                "CreateContainerError",
                &format!("pod folder {}: {e}", dir.display()),
            )
            .await;
            return;
        }
        let mut report = ContainerReport {
            name: container.name.clone(),
            image: image.clone(),
            container_id: None,
            restart_count: 0,
            state: ContainerState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last_state: None,
        };
        self.patch(
            &pod,
            status::pod_status_patch("Pending", &start_time, &report, None, None),
        )
        .await;

        let prepared = match prepare(&self.client, settings, &pod, &dir).await {
            Ok(p) => p,
            Err(e) => {
                self.fail_unstarted(&pod, "CreateContainerConfigError", &format!("{e:#}"))
                    .await;
                return;
            }
        };

        loop {
            if *stop.borrow() != Stop::Run {
                return;
            }
            let _ = std::fs::write(&prepared.termination_log, b"");
            let log_from = std::fs::metadata(&prepared.log)
                .map(|m| m.len())
                .unwrap_or(0);
            let spawned = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&prepared.log)
                .and_then(|out| {
                    let err = out.try_clone()?;
                    tokio::process::Command::new(&prepared.program)
                        .args(&prepared.args)
                        .env_clear()
                        .envs(&prepared.env)
                        .current_dir(&prepared.dir)
                        .stdin(std::process::Stdio::null())
                        .stdout(out)
                        .stderr(err)
                        .process_group(0)
                        .spawn()
                });
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    self.fail_unstarted(
                        &pod,
                        "StartError",
                        &format!("starting {}: {e}", prepared.program.display()),
                    )
                    .await;
                    return;
                }
            };
            let pid = child.id().unwrap_or(0) as i32;
            let _ = std::fs::write(dir.join("pid"), format!("{pid}\n"));
            let container_id = format!("kubewan://{}/{}", pod.uid().unwrap_or_default(), pid);
            let run_started = status::now();
            info!(pod = %name, pid, program = %prepared.program.display(), args = ?prepared.args, "started");
            report.container_id = Some(container_id.clone());
            report.state = ContainerState::Running {
                started_at: run_started.clone(),
            };
            self.patch(
                &pod,
                status::pod_status_patch("Running", &start_time, &report, None, None),
            )
            .await;

            let deadline_sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => futures::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                st = child.wait() => {
                    let st = st.unwrap_or_else(|_| std::process::ExitStatus::from_raw(255 << 8));
                    // Like a container's cgroup: nothing outlives the main process.
                    unsafe { libc::kill(-pid, libc::SIGKILL); }
                    Outcome::Exited(st)
                }
                _ = deadline_sleep => Outcome::Deadline(stop_process(&mut child, pid, grace_period(&pod)).await),
                _ = wait_stop(&mut stop) => {
                    let why = *stop.borrow();
                    Outcome::Stopped(why, stop_process(&mut child, pid, grace_period(&pod)).await)
                }
            };
            let _ = std::fs::remove_file(dir.join("pid"));
            let finished = status::now();
            let terminated = |st: &std::process::ExitStatus, reason: Option<&str>| {
                let (code, signal) = exit_code(st);
                let failed = code != 0;
                let reason = reason
                    .unwrap_or(if failed { "Error" } else { "Completed" })
                    .to_string();
                Terminated {
                    exit_code: code,
                    signal,
                    reason,
                    message: status::termination_message(
                        &prepared.termination_log,
                        &prepared.log,
                        log_from,
                        prepared.fallback_to_logs,
                        failed,
                    ),
                    started_at: run_started.clone(),
                    finished_at: finished.clone(),
                    container_id: container_id.clone(),
                }
            };
            match outcome {
                Outcome::Exited(st) => {
                    let t = terminated(&st, None);
                    info!(pod = %name, exit_code = t.exit_code, "exited");
                    let failed = t.exit_code != 0;
                    let restart = match restart_policy.as_str() {
                        "Always" => true,
                        "OnFailure" => failed,
                        _ => false,
                    };
                    if restart {
                        // CrashLoopBackOff: 10 s doubling up to 5 min, as the kubelet.
                        let backoff =
                            Duration::from_secs(10u64 << report.restart_count.min(5) as u32)
                                .min(Duration::from_secs(300));
                        report.last_state = Some(ContainerState::Terminated(t));
                        report.state = ContainerState::Waiting {
                            reason: "CrashLoopBackOff".into(),
                            message: Some(format!(
                                "back-off {}s restarting failed container",
                                backoff.as_secs()
                            )),
                        };
                        report.restart_count += 1;
                        self.patch(
                            &pod,
                            status::pod_status_patch("Running", &start_time, &report, None, None),
                        )
                        .await;
                        let deadline_sleep = async {
                            match deadline {
                                Some(d) => tokio::time::sleep_until(d).await,
                                None => futures::future::pending().await,
                            }
                        };
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => continue,
                            _ = wait_stop(&mut stop) => {
                                if *stop.borrow() == Stop::Delete { self.confirm_delete(&pod).await; }
                                return;
                            }
                            _ = deadline_sleep => {
                                let msg = format!("Pod was active on the node longer than the specified deadline ({}s)", spec.active_deadline_seconds.unwrap_or(0));
                                self.patch(&pod, status::pod_status_patch("Failed", &start_time, &report, Some("DeadlineExceeded"), Some(&msg))).await;
                                return;
                            }
                        }
                    }
                    let phase = if failed { "Failed" } else { "Succeeded" };
                    report.state = ContainerState::Terminated(t);
                    self.patch(
                        &pod,
                        status::pod_status_patch(phase, &start_time, &report, None, None),
                    )
                    .await;
                    return;
                }
                Outcome::Deadline(st) => {
                    let t = terminated(&st, Some("DeadlineExceeded"));
                    let msg = format!(
                        "Pod was active on the node longer than the specified deadline ({}s)",
                        spec.active_deadline_seconds.unwrap_or(0)
                    );
                    info!(pod = %name, "deadline exceeded, killed");
                    report.state = ContainerState::Terminated(t);
                    self.patch(
                        &pod,
                        status::pod_status_patch(
                            "Failed",
                            &start_time,
                            &report,
                            Some("DeadlineExceeded"),
                            Some(&msg),
                        ),
                    )
                    .await;
                    return;
                }
                Outcome::Stopped(why, st) => {
                    let mut t = terminated(&st, None);
                    if t.exit_code == 0 {
                        t.reason = "Completed".into();
                    }
                    report.state = ContainerState::Terminated(t);
                    match why {
                        Stop::Delete => {
                            info!(pod = %name, "pod deleted, process stopped");
                            self.patch(
                                &pod,
                                status::pod_status_patch(
                                    "Failed",
                                    &start_time,
                                    &report,
                                    None,
                                    None,
                                ),
                            )
                            .await;
                            self.confirm_delete(&pod).await;
                        }
                        _ => {
                            info!(pod = %name, "agent stopping, process stopped");
                            let _ = tokio::time::timeout(
                                Duration::from_secs(2),
                                self.patch(
                                    &pod,
                                    status::pod_status_patch(
                                        "Failed",
                                        &start_time,
                                        &report,
                                        Some("NodeAgentStopped"),
                                        Some("kubewan-node-agent stopped; the process was killed"),
                                    ),
                                ),
                            )
                            .await;
                        }
                    }
                    return;
                }
            }
        }
    }
}

/// Resolves when the stop signal leaves `Stop::Run` (or its sender is gone).
async fn wait_stop(stop: &mut watch::Receiver<Stop>) {
    loop {
        if *stop.borrow_and_update() != Stop::Run {
            return;
        }
        if stop.changed().await.is_err() {
            futures::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "x".to_string());
        assert_eq!(expand("$(A)/$(B)/$$(A)/$", &env), "x/$(B)/$(A)/$");
        assert_eq!(expand("é$(A)", &env), "éx");
    }

    #[test]
    fn program_lookup_prefers_bin_dir() {
        let dir = std::env::temp_dir().join(format!("kna-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sh = resolve_program("/bin/sh", &dir, "/usr/bin:/bin").unwrap();
        assert!(sh.ends_with("sh"));
        std::fs::write(dir.join("sh"), "#!/bin/true\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_program("/bin/sh", &dir, "").unwrap(),
            dir.join("sh")
        );
        assert!(resolve_program("no-such-program-kna", &dir, "/usr/bin").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
