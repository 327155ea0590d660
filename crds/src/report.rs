//! What a runner measured: written as JSON to the pod's termination message
//! (bounded, < 4 KiB) and to the output volume, folded by the operator into the
//! TravelJob status. Local mode folds the same reports the same way.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::task::Stage;

/// The kubelet keeps at most 4096 bytes of a termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// One memory reading.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySample {
    /// Process resident set size, bytes.
    pub rss_bytes: u64,
    /// Memory the system (or the cgroup, when it is smaller) can still give, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    /// Device memory in use (all processes), bytes; absent without a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_used_bytes: Option<u64>,
}

/// One named phase of a run (vlm_load, vlm_generate, vlm_release, video_load,
/// text_encode, denoise, vae_decode, encode, stitch, ...).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseReport {
    pub name: String,
    pub seconds: f64,
    pub start: MemorySample,
    pub end: MemorySample,
    /// Kernel high-water mark of RSS during this phase (reset at its start), bytes.
    pub peak_rss_bytes: u64,
    /// Peak device memory during this phase, bytes; absent without a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram_bytes: Option<u64>,
}

/// Whether a dropped model really gave its memory back.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseReport {
    /// What was released (e.g. the VLM's model folder name).
    pub what: String,
    /// RSS gained by loading (RSS after load minus the baseline before it), bytes.
    pub loaded_bytes: u64,
    /// RSS given back by the release, bytes.
    pub freed_bytes: u64,
    /// freed / loaded (1.0 = all of it came back).
    pub freed_ratio: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_loaded_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_freed_bytes: Option<u64>,
    /// Set when less than 95 % came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The outcome of one prompt written by the prompts stage.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptOutcome {
    pub segment: u32,
    /// The prompt the segment will use (possibly shortened in reports; the full text is in prompts.json).
    pub prompt: String,
    /// True when the VLM failed for this pair and the segment's own prompt was used.
    #[serde(default)]
    pub fell_back: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Everything one runner invocation (one pod, or one stage in local mode) reports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<u32>,
    pub ok: bool,
    /// What went wrong (when not ok), or a short human summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The video or VLM model used; `preview` for the built-in preview.
    #[serde(default)]
    pub model: String,
    /// True when the output comes from the built-in preview model, not a real one.
    #[serde(default)]
    pub preview: bool,
    pub seconds: f64,
    /// Highest RSS of the whole run, bytes.
    pub peak_rss_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<PromptOutcome>,
    /// Output file, relative to the job's output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl RunReport {
    /// JSON that fits a termination message: when the full report is too long,
    /// prompts are shortened, then phases dropped from the middle, then warnings
    /// shortened, so the figures the operator folds (peaks, release, output) survive.
    pub fn to_termination_message(&self) -> String {
        let mut report = self.clone();
        let fits = |r: &RunReport| {
            serde_json::to_string(r)
                .map(|s| s.len() < TERMINATION_MESSAGE_LIMIT)
                .unwrap_or(false)
        };
        for max in [400usize, 160, 60] {
            if fits(&report) {
                break;
            }
            for p in &mut report.prompts {
                p.prompt = shorten(&p.prompt, max);
                p.reason = p.reason.as_deref().map(|r| shorten(r, max));
            }
            report.message = report.message.as_deref().map(|m| shorten(m, max * 2));
            report.warnings = report.warnings.iter().map(|w| shorten(w, max)).collect();
        }
        while !fits(&report) && !report.phases.is_empty() {
            report.phases.remove(report.phases.len() / 2);
        }
        while !fits(&report) && (!report.prompts.is_empty() || !report.warnings.is_empty()) {
            report.prompts.pop();
            report.warnings.pop();
        }
        serde_json::to_string(&report).expect("a report always serialises")
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_report_is_bounded_and_keeps_the_peaks() {
        let report = RunReport {
            stage: Stage::Prompts,
            ok: true,
            peak_rss_bytes: 123_456_789,
            prompts: (0..20)
                .map(|i| PromptOutcome {
                    segment: i,
                    prompt: "a slow dolly shot ".repeat(40),
                    ..Default::default()
                })
                .collect(),
            phases: (0..40)
                .map(|i| PhaseReport {
                    name: format!("phase{i}"),
                    ..Default::default()
                })
                .collect(),
            release: Some(ReleaseReport {
                what: "vlm".into(),
                loaded_bytes: 10,
                freed_bytes: 10,
                freed_ratio: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = report.to_termination_message();
        assert!(
            json.len() < TERMINATION_MESSAGE_LIMIT,
            "{} bytes",
            json.len()
        );
        let back: RunReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.peak_rss_bytes, 123_456_789);
        assert_eq!(back.release, report.release);
    }

    #[test]
    fn shorten_respects_char_boundaries() {
        assert_eq!(shorten("héllo wörld", 6), "hé...");
        assert_eq!(shorten("short", 10), "short");
    }
}
