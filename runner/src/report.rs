//! Writing a run's report: the bounded JSON to the termination message path,
//! the full JSON (`report-<run>.json`) and the memory timeline
//! (`memory-<run>.svg`) to the job's output folder, where `<run>` is the
//! step's [`StepId::run_name`] (`prompts`, `segment-3`, `stitch`), and a human
//! summary to the log.

use std::path::{Path, PathBuf};

use anyhow::Result;
use kubewan_crds::StepId;
use kubewan_crds::report::{AdmissionReport, RunReport};
use kubewan_crds::status::human_bytes;

use crate::fsutil::write_atomic;
use crate::memplot;
use crate::probe::ProbeRecord;

/// Default termination message path (the kubelet reads it).
pub const TERMINATION_LOG_DEFAULT: &str = "/dev/termination-log";
/// Environment variable overriding the termination message path.
pub const TERMINATION_LOG_ENV: &str = "KUBEWAN_TERMINATION_LOG";

pub fn timeline_file_name(step: StepId) -> String {
    format!("memory-{}.svg", step.run_name())
}

/// Copies what the probe recorded into the report.
pub fn fill_from_probe(report: &mut RunReport, record: &ProbeRecord) {
    report.seconds = record.seconds;
    report.peak_rss_bytes = record.peak_rss_bytes;
    report.peak_vram_bytes = record.peak_vram_bytes;
    report.peak_vram_device_bytes = record.peak_vram_device_bytes;
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
    let path = dir.join(report.step.report_file_name());
    match write_atomic(&path, json.as_bytes()) {
        Ok(()) => written.push(path),
        Err(e) => problems.push(format!("{e:#}")),
    }
    let title = format!(
        "kubewan-runner {}, model {}",
        report.step.run_name(),
        shown_model(report)
    );
    let svg = memplot::render_svg(&title, record);
    let path = dir.join(timeline_file_name(report.step));
    match write_atomic(&path, svg.as_bytes()) {
        Ok(()) => written.push(path),
        Err(e) => problems.push(format!("{e:#}")),
    }
    (written, problems)
}

/// The run's model as the log and the timeline show it ("-" when it used none).
fn shown_model(report: &RunReport) -> String {
    if report.model.is_empty() {
        "-".into()
    } else {
        report.model_label()
    }
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

/// A few human-readable lines: what ran, how long, memory per phase, each
/// phase's admission, how the segment was generated.
pub fn summary(report: &RunReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{}: {} in {:.1}s, model {}{}, peak RSS {}{}\n",
        report.step.run_name(),
        if report.ok { "ok" } else { "FAILED" },
        report.seconds,
        shown_model(report),
        report
            .device
            .as_ref()
            .map(|d| format!(" on {d}"))
            .unwrap_or_default(),
        human_bytes(report.peak_rss_bytes),
        report
            .peak_vram_bytes
            .map(|v| format!(
                ", peak VRAM {} (this process{})",
                human_bytes(v),
                report
                    .peak_vram_device_bytes
                    .map(|d| format!("; whole device {}", human_bytes(d)))
                    .unwrap_or_default()
            ))
            .unwrap_or_default()
    ));
    for p in &report.phases {
        out.push_str(&format!(
            "  {:<16} {:>7.2}s  RSS {} -> {} (peak {}){}{}\n",
            p.name,
            p.seconds,
            human_bytes(p.start.rss_bytes),
            human_bytes(p.end.rss_bytes),
            human_bytes(p.peak_rss_bytes),
            p.end
                .available_bytes
                .map(|a| format!(", available {}", human_bytes(a)))
                .unwrap_or_default(),
            match (
                p.start.vram_process_bytes,
                p.end.vram_process_bytes,
                p.peak_vram_bytes
            ) {
                (Some(start), Some(end), Some(peak)) => format!(
                    ", VRAM {} -> {} (peak {})",
                    human_bytes(start),
                    human_bytes(end),
                    human_bytes(peak)
                ),
                _ => String::new(),
            }
        ));
    }
    for a in &report.admission {
        out.push_str(&format!("  {}\n", admission_line(a)));
    }
    if let Some(g) = &report.generation {
        let guidance: Vec<String> = g
            .experts
            .iter()
            .map(|e| {
                let batched = if e.guidance_batched {
                    " (batch of 2)"
                } else {
                    ""
                };
                format!("{}{batched}", e.guidance)
            })
            .collect();
        out.push_str(&format!(
            "  generated in {} by {} with {} steps (shift {}), seed {}, guidance {}\n",
            wire_name(g.dtype),
            wire_name(g.scheduler),
            g.steps,
            g.shift,
            g.seed,
            guidance.join("/")
        ));
    }
    if let Some(c) = &report.chain {
        out.push_str(&format!(
            "  chained: {} first frames from the previous segment's tail, {} last frames handed on\n",
            c.head_frames, c.tail_frames
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
            match (p.fell_back, p.tokens) {
                (true, _) => format!(
                    " (fell back: {})",
                    p.reason.as_deref().unwrap_or("unknown reason")
                ),
                (false, Some(t)) => format!(" ({t} tokens by the VLM)"),
                (false, None) => String::new(),
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

/// "admission denoise: needs 1.2GiB of 20.3GiB RAM available" (VRAM too on a GPU).
pub fn admission_line(a: &AdmissionReport) -> String {
    let of = |need: u64, available: Option<u64>| match available {
        Some(av) => format!("{} of {} available", human_bytes(need), human_bytes(av)),
        None => format!("{} (available unknown)", human_bytes(need)),
    };
    let mut line = format!(
        "admission {}: needs {} RAM",
        a.phase,
        of(a.need_ram_bytes, a.available_ram_bytes)
    );
    if let Some(v) = a.need_vram_bytes {
        line.push_str(&format!(", {} VRAM", of(v, a.available_vram_bytes)));
    }
    if !a.admitted {
        line.push_str(" -- REFUSED");
    }
    line
}

/// An enum value as the API spells it (`bf16`, `unipc`).
fn wire_name(value: impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
