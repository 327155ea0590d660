//! Pod and container status documents, written the way a kubelet writes them.
//!
//! Pod status is sent as a strategic merge patch: `conditions` merge by `type`
//! (so the scheduler's `PodScheduled` condition is kept), `containerStatuses`
//! is replaced as a whole.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::{Value, json};

/// The kubelet's cap on one container's termination message.
pub const MAX_TERMINATION_MESSAGE: usize = 4096;
/// `FallbackToLogsOnError`: at most this many lines ...
pub const FALLBACK_LOG_LINES: usize = 80;
/// ... and at most this many bytes of the log's tail.
pub const FALLBACK_LOG_BYTES: u64 = 2048;

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A container's `state` (or `lastState`).
#[derive(Clone, Debug)]
pub enum ContainerState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated(Terminated),
}

#[derive(Clone, Debug)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: String,
    pub started_at: String,
    pub finished_at: String,
    pub container_id: String,
}

impl ContainerState {
    pub fn to_json(&self) -> Value {
        match self {
            ContainerState::Waiting { reason, message } => {
                let mut w = json!({ "reason": reason });
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({ "waiting": w })
            }
            ContainerState::Running { started_at } => {
                json!({ "running": { "startedAt": started_at } })
            }
            ContainerState::Terminated(t) => {
                let mut v = json!({
                    "exitCode": t.exit_code,
                    "reason": t.reason,
                    "startedAt": t.started_at,
                    "finishedAt": t.finished_at,
                    "containerID": t.container_id,
                });
                if !t.message.is_empty() {
                    v["message"] = json!(t.message);
                }
                if let Some(s) = t.signal {
                    v["signal"] = json!(s);
                }
                json!({ "terminated": v })
            }
        }
    }
}

/// Everything the agent reports about its one container.
#[derive(Clone, Debug)]
pub struct ContainerReport {
    pub name: String,
    pub image: String,
    pub container_id: Option<String>,
    pub restart_count: i32,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
}

impl ContainerReport {
    fn ready(&self) -> bool {
        matches!(self.state, ContainerState::Running { .. })
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready(),
            "restartCount": self.restart_count,
            "started": self.ready(),
            "state": self.state.to_json(),
            "lastState": self.last_state.as_ref().map(|s| s.to_json()).unwrap_or_else(|| json!({})),
        });
        if let Some(id) = &self.container_id {
            v["containerID"] = json!(id);
        }
        v
    }
}

fn condition(kind: &str, status: bool, reason: Option<&str>, ts: &str) -> Value {
    let mut c = json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "lastProbeTime": null,
        "lastTransitionTime": ts,
    });
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    c
}

/// The pod status patch for a phase and a container report.
/// `pod_reason`/`pod_message` go to `status.reason`/`status.message`
/// (e.g. `DeadlineExceeded`).
pub fn pod_status_patch(
    phase: &str,
    start_time: &str,
    container: &ContainerReport,
    pod_reason: Option<&str>,
    pod_message: Option<&str>,
) -> Value {
    let ts = now();
    let ready = container.ready();
    let not_ready_reason = match phase {
        "Succeeded" | "Failed" => "PodCompleted",
        _ => "ContainersNotReady",
    };
    let nr = if ready { None } else { Some(not_ready_reason) };
    let mut status = json!({
        "phase": phase,
        "startTime": start_time,
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "podIPs": [{ "ip": "127.0.0.1" }],
        "conditions": [
            condition("Initialized", true, None, &ts),
            condition("Ready", ready, nr, &ts),
            condition("ContainersReady", ready, nr, &ts),
            condition("PodScheduled", true, None, &ts),
        ],
        "containerStatuses": [container.to_json()],
        "reason": pod_reason,
        "message": pod_message,
    });
    if pod_reason.is_none() {
        status["reason"] = Value::Null;
    }
    json!({ "status": status })
}

/// Truncates to at most `max` bytes on a char boundary.
pub fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The content of a termination message file (capped like the kubelet does).
pub fn read_termination_file(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_TERMINATION_MESSAGE as u64).read_to_end(&mut buf);
    }
    let s = String::from_utf8_lossy(&buf).into_owned();
    truncate_bytes(&s, MAX_TERMINATION_MESSAGE).to_string()
}

/// The tail of a log file written since byte `from`: at most
/// [`FALLBACK_LOG_BYTES`] bytes and [`FALLBACK_LOG_LINES`] lines.
pub fn log_tail(path: &Path, from: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(FALLBACK_LOG_BYTES));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(FALLBACK_LOG_BYTES).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let keep = &lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..];
    keep.join("\n")
}

/// The termination message the kubelet would report.
pub fn termination_message(
    file: &Path,
    log: &Path,
    log_from: u64,
    fallback_to_logs: bool,
    failed: bool,
) -> String {
    let msg = read_termination_file(file);
    if msg.is_empty() && fallback_to_logs && failed {
        return log_tail(log, log_from);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn fallback_tail_is_bounded_by_lines_and_bytes() {
        let dir = std::env::temp_dir().join(format!("kna-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let mut f = std::fs::File::create(&log).unwrap();
        for i in 0..200 {
            writeln!(f, "line {i}").unwrap();
        }
        drop(f);
        let tail = log_tail(&log, 0);
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 80);
        assert_eq!(lines.last().unwrap(), &"line 199");
        assert_eq!(lines[0], "line 120");

        // Only what this attempt wrote.
        let len = std::fs::metadata(&log).unwrap().len();
        assert_eq!(log_tail(&log, len), "");

        let term = dir.join("term");
        std::fs::write(&term, "").unwrap();
        assert_eq!(termination_message(&term, &log, 0, true, false), "");
        assert!(termination_message(&term, &log, 0, true, true).ends_with("line 199"));
        assert_eq!(termination_message(&term, &log, 0, false, true), "");
        std::fs::write(&term, "x".repeat(10_000)).unwrap();
        assert_eq!(
            termination_message(&term, &log, 0, true, true).len(),
            MAX_TERMINATION_MESSAGE
        );

        let big: String = "y".repeat(5000);
        let mut f = std::fs::File::create(&log).unwrap();
        f.write_all(big.as_bytes()).unwrap();
        drop(f);
        assert_eq!(log_tail(&log, 0).len(), FALLBACK_LOG_BYTES as usize);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn terminated_state_json() {
        let t = ContainerState::Terminated(Terminated {
            exit_code: 3,
            signal: None,
            reason: "Error".into(),
            message: "boom".into(),
            started_at: "a".into(),
            finished_at: "b".into(),
            container_id: "kubewan://x".into(),
        });
        let v = t.to_json();
        assert_eq!(v["terminated"]["exitCode"], 3);
        assert_eq!(v["terminated"]["message"], "boom");
        let report = ContainerReport {
            name: "c".into(),
            image: "i".into(),
            container_id: Some("kubewan://x".into()),
            restart_count: 0,
            state: t,
            last_state: None,
        };
        let p = pod_status_patch("Failed", "s", &report, None, None);
        assert_eq!(p["status"]["phase"], "Failed");
        assert_eq!(p["status"]["containerStatuses"][0]["ready"], false);
        assert_eq!(p["status"]["conditions"][1]["reason"], "PodCompleted");
    }
}
