//! `run-task`: the pod entry point. Reads the task JSON from `KUBEWAN_TASK`,
//! runs its step against the mounted volumes, writes the bounded report to
//! the termination message path and `report-<run>.json` to the job's
//! output folder, logs a summary, and prints the report as the last log line
//! (for `terminationMessagePolicy: FallbackToLogsOnError`). Exit code 0 when
//! the stage succeeded, 1 otherwise (always after writing a report, a panic
//! included: see [`crate::panics`]). A task that does not parse is named by
//! the field where it went wrong.

use std::path::{Path, PathBuf};

use kubewan_crds::report::RunReport;
use kubewan_crds::task::Task;

use crate::progress::LogProgress;
use crate::report::{summary, write_termination_message};
use crate::stages::{self, Mounts};
use crate::{EXIT_FAILURE, panics};

/// Parses the task JSON with a message that says what is wrong.
pub fn parse_task(json: Option<&str>) -> Result<Task, String> {
    let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
        return Err(format!(
            "no task: the environment variable {} is empty or unset",
            kubewan_crds::task::TASK_ENV
        ));
    };
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let at = if field == "." {
            String::new()
        } else {
            format!(" at field {field}")
        };
        format!(
            "the task JSON in {} does not parse{at}: {}",
            kubewan_crds::task::TASK_ENV,
            e.inner()
        )
    })
}

/// Writes `report` to the termination log, logs it, and returns the exit code.
fn finish(report: &RunReport, termination_log: &Path) -> i32 {
    for line in summary(report).lines() {
        tracing::info!("{line}");
    }
    if let Err(e) = write_termination_message(report, termination_log) {
        tracing::warn!("{e:#}");
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
                ok: false,
                message: Some(message),
                ..Default::default()
            };
            return finish(&report, &termination_log);
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        job = %task.job,
        step = %task.step,
        "kubewan-runner starts"
    );
    // Replaced by the real report at the end; stays if the process is killed first.
    let provisional = RunReport {
        ok: false,
        step: task.step,
        message: Some(
            "the runner stopped before writing its report: killed (out of memory, a signal) \
             or aborted"
                .into(),
        ),
        ..Default::default()
    };
    if let Err(e) = write_termination_message(&provisional, &termination_log) {
        tracing::warn!("{e:#}");
    }
    let progress = LogProgress::default();
    match panics::catch(|| stages::run(&task, &mounts, stages::device_for(&task), &progress)) {
        Ok(outcome) => {
            for f in &outcome.files {
                tracing::info!("wrote {}", f.display());
            }
            finish(&outcome.report, &termination_log)
        }
        Err(message) => finish(
            &RunReport {
                ok: false,
                message: Some(message),
                ..provisional
            },
            &termination_log,
        ),
    }
}
