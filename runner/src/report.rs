//! Writing a run's report: the bounded JSON to the termination message path,
//! the full JSON (`report-<stage>[-<i>].json`) and the memory timeline
//! (`memory-<stage>[-<i>].svg`) to the job's output folder, and a human
//! summary to the log.

use std::path::{Path, PathBuf};

use anyhow::Result;
use kubewan_crds::report::RunReport;
use kubewan_crds::status::human_bytes;
use kubewan_crds::task::Stage;

use crate::fsutil::write_atomic;
use crate::memplot;
use crate::probe::ProbeRecord;

/// Default termination message path (the kubelet reads it).
pub const TERMINATION_LOG_DEFAULT: &str = "/dev/termination-log";
/// Environment variable overriding the termination message path.
pub const TERMINATION_LOG_ENV: &str = "KUBEWAN_TERMINATION_LOG";

/// `<stage>` or `<stage>-<i>`: the suffix of a run's report and timeline files.
pub fn run_name(stage: Stage, segment: Option<u32>) -> String {
    match segment {
        Some(i) => format!("{}-{i}", stage.as_str()),
        None => stage.as_str().to_owned(),
    }
}

pub fn report_file_name(stage: Stage, segment: Option<u32>) -> String {
    format!("report-{}.json", run_name(stage, segment))
}

pub fn timeline_file_name(stage: Stage, segment: Option<u32>) -> String {
    format!("memory-{}.svg", run_name(stage, segment))
}

/// Copies what the probe recorded into the report.
pub fn fill_from_probe(report: &mut RunReport, record: &ProbeRecord) {
    report.seconds = record.seconds;
    report.peak_rss_bytes = record.peak_rss_bytes;
    report.peak_vram_bytes = record.peak_vram_bytes;
    report.phases = record.phases.clone();
    for w in &record.warnings {
        if !report.warnings.contains(w) {
            report.warnings.push(w.clone());
        }
    }
}

/// Writes the report JSON and the memory timeline into `job_dir` (when given).
/// Returns the paths written; failures are logged and returned as warnings so a
/// broken output volume never hides the report itself.
pub fn write_outputs(
    report: &RunReport,
    record: &ProbeRecord,
    job_dir: Option<&Path>,
) -> (Vec<PathBuf>, Vec<String>) {
    let mut written = Vec::new();
    let mut problems = Vec::new();
    let Some(dir) = job_dir else {
        return (written, problems);
    };
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    let path = dir.join(report_file_name(report.stage, report.segment));
    match write_atomic(&path, json.as_bytes()) {
        Ok(()) => written.push(path),
        Err(e) => problems.push(format!("{e:#}")),
    }
    let title = format!(
        "kubewan-runner {}{}",
        run_name(report.stage, report.segment),
        if report.preview { " (preview)" } else { "" }
    );
    let svg = memplot::render_svg(&title, record);
    let path = dir.join(timeline_file_name(report.stage, report.segment));
    match write_atomic(&path, svg.as_bytes()) {
        Ok(()) => written.push(path),
        Err(e) => problems.push(format!("{e:#}")),
    }
    (written, problems)
}

/// Writes the bounded report to the termination message path.
pub fn write_termination_message(report: &RunReport, path: &Path) -> Result<()> {
    let message = report.to_termination_message();
    std::fs::write(path, message.as_bytes()).map_err(|e| {
        anyhow::anyhow!(
            "cannot write the termination message {}: {e}",
            path.display()
        )
    })
}

/// A few human-readable lines: what ran, how long, memory per phase.
pub fn summary(report: &RunReport) -> String {
    let mut out = String::new();
    let what = run_name(report.stage, report.segment);
    let model = if report.preview {
        format!("{} (preview)", report.model)
    } else {
        report.model.clone()
    };
    out.push_str(&format!(
        "{what}: {} in {:.1}s, model {}, peak RSS {}{}\n",
        if report.ok { "ok" } else { "FAILED" },
        report.seconds,
        if model.is_empty() { "-".into() } else { model },
        human_bytes(report.peak_rss_bytes),
        report
            .peak_vram_bytes
            .map(|v| format!(", peak VRAM {}", human_bytes(v)))
            .unwrap_or_default()
    ));
    for p in &report.phases {
        out.push_str(&format!(
            "  {:<16} {:>7.2}s  RSS {} -> {} (peak {}){}\n",
            p.name,
            p.seconds,
            human_bytes(p.start.rss_bytes),
            human_bytes(p.end.rss_bytes),
            human_bytes(p.peak_rss_bytes),
            p.end
                .available_bytes
                .map(|a| format!(", available {}", human_bytes(a)))
                .unwrap_or_default()
        ));
    }
    if let Some(r) = &report.release {
        out.push_str(&format!(
            "  release of {}: loaded {}, freed {} ({:.1}%){}\n",
            r.what,
            human_bytes(r.loaded_bytes),
            human_bytes(r.freed_bytes),
            100.0 * r.freed_ratio,
            r.warning
                .as_deref()
                .map(|w| format!(" WARNING: {w}"))
                .unwrap_or_default()
        ));
    }
    for p in &report.prompts {
        out.push_str(&format!(
            "  prompt {}{}: {}\n",
            p.segment,
            if p.fell_back {
                format!(
                    " (fell back: {})",
                    p.reason.as_deref().unwrap_or("unknown reason")
                )
            } else {
                String::new()
            },
            p.prompt
        ));
    }
    if let Some(o) = &report.output {
        out.push_str(&format!(
            "  output {o}{}\n",
            report
                .frames
                .map(|f| format!(" ({f} frames)"))
                .unwrap_or_default()
        ));
    }
    for w in &report.warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    if let Some(m) = &report.message {
        out.push_str(&format!("  {m}\n"));
    }
    out
}
