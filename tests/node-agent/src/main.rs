//! kubewan-node-agent: plays the kubelet for one Node of the test control
//! plane (tests/k8s/cluster.sh). It runs every pod bound to its node as a local
//! process and writes the pod's phase, container state, exit code and
//! termination message back; it keeps the node's Ready condition fresh.
//!
//! Mapping of a pod onto this machine:
//! - command[0]: looked up in `--bin-dir` (default: the folder of this binary,
//!   i.e. the cargo target dir that also holds `kubewan-runner`), then as a
//!   path, then on PATH. A container without `command` runs
//!   `--default-command` (kubewan-runner), standing in for the image entrypoint.
//! - volumes: hostPath P → `<host-root>/P`, persistentVolumeClaim C →
//!   `<host-root>/pvc/C`, emptyDir → a per-pod folder; configMap/secret
//!   volumes are written out from the API.
//! - mounts at /ckpts, /inputs, /output → KUBEWAN_CKPTS, KUBEWAN_INPUTS,
//!   KUBEWAN_OUTPUT; the termination message file → KUBEWAN_TERMINATION_LOG.
//! - stdout+stderr → `<state-dir>/pods/<ns>_<name>_<uid>/container.log`.

mod pod;
mod status;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::pod::{PodCtx, Settings, Stop};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Test kubelet stand-in: runs the pods bound to one Node as local processes"
)]
struct Args {
    /// The Node this agent plays the kubelet for (it must exist).
    #[arg(long, env = "KUBEWAN_NODE_NAME", default_value = "gpu-node-1")]
    node_name: String,
    /// Where per-pod folders (logs, termination-log, emptyDirs) go.
    /// Default: $KUBEWAN_CLUSTER_DIR/agent, else ~/.cache/kubewan/cluster/agent.
    #[arg(long, env = "KUBEWAN_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Root of the "host" filesystem for hostPath and PVC volumes.
    /// Default: <state-dir>/../host (i.e. $KUBEWAN_CLUSTER_DIR/host).
    #[arg(long, env = "KUBEWAN_HOST_ROOT")]
    host_root: Option<PathBuf>,
    /// Folder searched first for command[0]. Default: this binary's folder.
    #[arg(long, env = "KUBEWAN_AGENT_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Program run when a container has no `command` (the image's entrypoint).
    #[arg(
        long,
        env = "KUBEWAN_AGENT_DEFAULT_COMMAND",
        default_value = "kubewan-runner"
    )]
    default_command: String,
    /// Variables of the agent's own environment passed on to every process.
    #[arg(
        long,
        env = "KUBEWAN_AGENT_PASS_ENV",
        value_delimiter = ',',
        default_value = "LD_LIBRARY_PATH,CUDA_VISIBLE_DEVICES,NVIDIA_VISIBLE_DEVICES,RUST_BACKTRACE,TMPDIR,LANG"
    )]
    pass_env: Vec<String>,
    /// Seconds between the node's Ready heartbeats.
    #[arg(long, env = "KUBEWAN_AGENT_HEARTBEAT_SECONDS", default_value_t = 10)]
    heartbeat_seconds: u64,
}

struct Running {
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

struct Agent {
    ctx: Arc<PodCtx>,
    /// Every pod this agent started (finished ones too, so that a stale
    /// event never runs a pod twice), until the pod is gone.
    running: HashMap<String, Running>,
    /// Pods whose deletion this agent already confirmed.
    deleting: HashSet<String>,
}

impl Agent {
    fn on_pod(&mut self, pod: Pod) {
        let Some(uid) = pod.uid() else { return };
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            match self.running.get(&uid) {
                Some(r) if !r.task.is_finished() => {
                    let _ = r.stop.send(Stop::Delete);
                }
                _ => {
                    if self.deleting.insert(uid.clone()) {
                        let ctx = self.ctx.clone();
                        tokio::spawn(async move { ctx.confirm_delete(&pod).await });
                    }
                }
            }
            return;
        }
        if self.running.contains_key(&uid) || phase == "Succeeded" || phase == "Failed" {
            return;
        }
        let has_container_statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| !c.is_empty());
        let (stop_tx, stop_rx) = watch::channel(Stop::Run);
        let ctx = self.ctx.clone();
        let task = if has_container_statuses {
            // Started by an earlier agent (which died): stop its process if it
            // is still there, and say the pod's outcome is lost.
            let killed = pod::kill_orphan(&ctx.settings, &pod);
            if let Some(pid) = killed {
                warn!(pod = %pod.name_any(), pid, "killed a process left by an earlier agent");
            }
            tokio::spawn(async move {
                ctx.fail_unstarted(
                    &pod,
                    "NodeAgentRestarted",
                    "the node agent restarted and lost this pod's process",
                )
                .await
            })
        } else {
            info!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()), "new pod");
            tokio::spawn(ctx.run(pod, stop_rx))
        };
        self.running.insert(
            uid,
            Running {
                stop: stop_tx,
                task,
            },
        );
    }

    fn on_gone(&mut self, uid: &str) {
        if let Some(r) = self.running.remove(uid) {
            let _ = r.stop.send(Stop::Delete);
            // The task finishes on its own (its pod is gone; the delete is a no-op).
        }
        self.deleting.remove(uid);
    }

    async fn shutdown(&mut self) {
        for r in self.running.values() {
            let _ = r.stop.send(Stop::Shutdown);
        }
        for (_, r) in self.running.drain() {
            let _ = tokio::time::timeout(Duration::from_secs(40), r.task).await;
        }
    }
}

async fn heartbeat(client: Client, node: String, every: Duration) {
    let nodes: Api<Node> = Api::all(client);
    let mut warned = false;
    loop {
        let now = status::now();
        let patch = json!({
            "status": {
                "conditions": [
                    { "type": "Ready", "status": "True", "reason": "KubeletReady",
                      "message": "kubewan-node-agent is posting ready status",
                      "lastHeartbeatTime": now },
                    { "type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": now },
                    { "type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": now },
                    { "type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": now },
                ]
            }
        });
        match nodes
            .patch_status(&node, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            Ok(_) => warned = false,
            Err(e) if !warned => {
                warn!(node = %node, error = %e, "node heartbeat failed (is the Node registered?)");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(every).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,kubewan_node_agent=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();

    let state_dir = match args.state_dir {
        Some(d) => d,
        None => std::env::var_os("KUBEWAN_CLUSTER_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kubewan/cluster"))
            })
            .context("no --state-dir, KUBEWAN_CLUSTER_DIR or HOME")?
            .join("agent"),
    };
    let state_dir = std::path::absolute(&state_dir)?;
    let host_root = std::path::absolute(match args.host_root {
        Some(h) => h,
        None => state_dir
            .parent()
            .map(|p| p.join("host"))
            .unwrap_or_else(|| state_dir.join("host")),
    })?;
    let bin_dir = match args.bin_dir {
        Some(b) => std::path::absolute(b)?,
        None => std::env::current_exe()?
            .parent()
            .context("binary has no folder")?
            .to_path_buf(),
    };
    std::fs::create_dir_all(state_dir.join("pods"))?;
    std::fs::create_dir_all(&host_root)?;
    info!(
        node = %args.node_name,
        state_dir = %state_dir.display(),
        host_root = %host_root.display(),
        bin_dir = %bin_dir.display(),
        "kubewan-node-agent starting"
    );

    let client = Client::try_default()
        .await
        .context("building a Kubernetes client (KUBECONFIG)")?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.get(&args.node_name).await.with_context(|| {
        format!(
            "Node {} must be registered before the agent starts",
            args.node_name
        )
    })?;

    let settings = Arc::new(Settings {
        node_name: args.node_name.clone(),
        state_dir,
        host_root,
        bin_dir,
        default_command: args.default_command,
        pass_env: args.pass_env,
    });
    let ctx = Arc::new(PodCtx {
        client: client.clone(),
        settings: settings.clone(),
    });
    tokio::spawn(heartbeat(
        client.clone(),
        args.node_name.clone(),
        Duration::from_secs(args.heartbeat_seconds.max(1)),
    ));

    let pods: Api<Pod> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let mut events = watcher(pods, cfg).default_backoff().boxed();
    let mut agent = Agent {
        ctx,
        running: HashMap::new(),
        deleting: HashSet::new(),
    };
    let mut seen: Option<HashSet<String>> = None;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = events.try_next() => {
                match ev {
                    Ok(Some(watcher::Event::Init)) => seen = Some(HashSet::new()),
                    Ok(Some(watcher::Event::InitApply(p))) => {
                        if let (Some(s), Some(uid)) = (seen.as_mut(), p.uid()) { s.insert(uid); }
                        agent.on_pod(p);
                    }
                    Ok(Some(watcher::Event::InitDone)) => {
                        if let Some(s) = seen.take() {
                            let gone: Vec<String> = agent.running.keys().filter(|u| !s.contains(*u)).cloned().collect();
                            for uid in gone { agent.on_gone(&uid); }
                        }
                    }
                    Ok(Some(watcher::Event::Apply(p))) => agent.on_pod(p),
                    Ok(Some(watcher::Event::Delete(p))) => {
                        if let Some(uid) = p.uid() { agent.on_gone(&uid); }
                    }
                    Ok(None) => { error!("pod watch ended"); break; }
                    Err(e) => warn!(error = %e, "pod watch error (retrying)"),
                }
            }
            _ = tokio::signal::ctrl_c() => { info!("interrupted"); break; }
            _ = term.recv() => { info!("terminated"); break; }
        }
    }
    agent.shutdown().await;
    info!("kubewan-node-agent stopped");
    Ok(())
}
