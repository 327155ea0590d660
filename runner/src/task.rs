//! `run-task`: the pod entry point. Reads the task JSON from `KUBEWAN_TASK`,
//! runs its stage against the mounted volumes, writes the bounded report to
//! the termination message path and `report-<stage>[-<i>].json` to the job's
//! output folder, logs a summary, and prints the report as the last log line
//! (for `terminationMessagePolicy: FallbackToLogsOnError`). Exit code 0 when
//! the stage succeeded, 1 otherwise (always after writing a report).

use std::path::{Path, PathBuf};

use kubewan_crds::report::RunReport;
use kubewan_crds::task::{Stage, Task};

use crate::EXIT_FAILURE;
use crate::progress::Progress;
use crate::report::{summary, write_termination_message};
use crate::stages::{self, Mounts};

/// Progress as occasional log lines (pods have no terminal).
pub struct LogProgress {
    state: std::sync::Mutex<(String, u64, u64, u64)>,
}

impl LogProgress {
    pub fn new() -> LogProgress {
        LogProgress {
            state: std::sync::Mutex::new((String::new(), 0, 0, 0)),
        }
    }
}

impl Default for LogProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for LogProgress {
    fn start(&self, what: &str, len: u64) {
        if let Ok(mut s) = self.state.lock() {
            *s = (what.to_owned(), len, 0, 0);
        }
        eprintln!("{what}: 0/{len}");
    }
    fn inc(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.2 += n;
            let decile = (s.2 * 10).checked_div(s.1).unwrap_or(0);
            if decile > s.3 {
                s.3 = decile;
                eprintln!("{}: {}/{}", s.0, s.2, s.1);
            }
        }
    }
    fn finish(&self) {}
}

/// Parses the task JSON with a message that says what is wrong.
pub fn parse_task(json: Option<&str>) -> Result<Task, String> {
    let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
        return Err(format!(
            "no task: the environment variable {} is empty or unset",
            kubewan_crds::task::TASK_ENV
        ));
    };
    serde_json::from_str(json).map_err(|e| {
        format!(
            "the task JSON in {} does not parse: {e}",
            kubewan_crds::task::TASK_ENV
        )
    })
}

/// Writes `report` to the termination log, logs it, and returns the exit code.
fn finish(report: &RunReport, termination_log: &Path) -> i32 {
    eprint!("{}", summary(report));
    if let Err(e) = write_termination_message(report, termination_log) {
        eprintln!("warning: {e}");
    }
    // Last log line: the report itself (the kubelet's fallback when the file is unreadable).
    println!("{}", report.to_termination_message());
    if report.ok { 0 } else { EXIT_FAILURE }
}

/// Runs the task; returns the process exit code.
pub fn run_task(task_json: Option<&str>, mounts: Mounts, termination_log: PathBuf) -> i32 {
    let task = match parse_task(task_json) {
        Ok(t) => t,
        Err(message) => {
            let report = RunReport {
                stage: Stage::default(),
                ok: false,
                message: Some(message),
                ..Default::default()
            };
            return finish(&report, &termination_log);
        }
    };
    eprintln!(
        "kubewan-runner {}: job {}, stage {}{}",
        env!("CARGO_PKG_VERSION"),
        task.job,
        task.stage.as_str(),
        task.segment.map(|i| format!(" {i}")).unwrap_or_default()
    );
    let progress = LogProgress::new();
    let outcome = stages::run(&task, &mounts, &progress);
    for f in &outcome.files {
        eprintln!("wrote {}", f.display());
    }
    finish(&outcome.report, &termination_log)
}
