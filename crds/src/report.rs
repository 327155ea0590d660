//! What a runner measured: written as JSON to the pod's termination message
//! (bounded, < 4 KiB) and to the output volume, read back from the message
//! by the operator ([`RunReport::from_termination_message`]) and folded into
//! the TravelJob status. Local mode folds the same reports the same way.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::{Dtype, Scheduler};
use crate::step::StepId;

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
    /// GPU memory this process holds (NVML's per-process figure), bytes;
    /// absent without a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_process_bytes: Option<u64>,
    /// GPU memory in use on the device, all processes counted, bytes; absent
    /// without a GPU.
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
    /// Peak GPU memory of this process during this phase, bytes; absent without a GPU.
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

/// What went wrong with the prompt-writing VLM. The names are the reasons of
/// the TravelJob conditions that show it (PromptsFellBack, Failed).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VlmIssue {
    /// Its memory admission refused it: it would not fit.
    VlmRefused,
    /// It failed to load or to generate.
    VlmFailed,
    /// It wrote an empty prompt.
    EmptyPrompt,
    /// After it was dropped, its memory did not come back.
    VlmNotReleased,
}

impl VlmIssue {
    /// The condition reason that shows this issue.
    pub fn reason(self) -> &'static str {
        match self {
            VlmIssue::VlmRefused => "VlmRefused",
            VlmIssue::VlmFailed => "VlmFailed",
            VlmIssue::EmptyPrompt => "EmptyPrompt",
            VlmIssue::VlmNotReleased => "VlmNotReleased",
        }
    }
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
    /// Why it fell back, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it fell back, as a condition reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<VlmIssue>,
    /// Tokens the VLM generated for this prompt (absent when it fell back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
}

/// The memory admission of one phase, checked before the model it needs was
/// loaded: what the phase needs (the weights resident in it at their load
/// dtype, plus an activation estimate for the job's shapes) against what the
/// process may still use (system and cgroup limit; VRAM on a GPU).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReport {
    pub phase: String,
    /// RAM the phase needs, bytes.
    pub need_ram_bytes: u64,
    /// RAM the process could still use when it was checked, bytes (absent when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_ram_bytes: Option<u64>,
    /// VRAM the phase needs, bytes (only when the models run on a GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub need_vram_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_vram_bytes: Option<u64>,
    /// False when the need is larger than what is available: the model was not loaded.
    pub admitted: bool,
}

/// A chained segment's seams: the frames it shares with its neighbours, as
/// digests of their RGB bytes before encoding ([`crate::hash::fnv1a`], hex).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainReport {
    /// Frames at the start that are the previous segment's tail, copied as they are.
    pub head_frames: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_digest: Option<String>,
    /// Frames at the end handed to the next segment (its tail file).
    pub tail_frames: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_digest: Option<String>,
}

/// How a video model generated a segment, with the values the model filled
/// in (the shift of its scheduler config when the spec sets none).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationReport {
    /// The dtype the transformers and the encoders ran in.
    pub dtype: Dtype,
    /// The seed of the initial noise (the spec's seed, the same for every segment).
    pub seed: u64,
    pub scheduler: Scheduler,
    pub steps: u32,
    /// The flow shift of the sigmas.
    pub shift: f64,
    /// The steps and guidance of each denoising transformer, in the order they ran.
    pub experts: Vec<ExpertReport>,
    /// Two-expert models: `both` (resident together) or `one at a time` (memory was short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency: Option<String>,
    /// The LoRAs merged, as `path@scale` (with `(low)` for the low-noise expert).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
}

/// What one denoising transformer did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpertReport {
    /// `high` (`transformer`) or `low` (`transformer_2`).
    pub expert: String,
    pub steps: u32,
    /// 1 or less: no unconditional pass.
    pub guidance: f64,
    /// The conditional and unconditional passes ran as one batch of 2 (the
    /// memory admission took it); otherwise as two passes, or one without guidance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guidance_batched: bool,
}

/// The longest warning a status summary keeps, in bytes.
const SUMMARY_TEXT_BYTES: usize = 300;
/// The warnings a status summary keeps.
const SUMMARY_WARNINGS: usize = 3;

/// Everything one runner invocation (one pod, or one stage in local mode) reports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    #[serde(flatten)]
    pub step: StepId,
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
    /// Where the models computed (`cuda:0`, `cpu`); absent when no model ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub seconds: f64,
    /// Highest RSS of the whole run, bytes.
    pub peak_rss_bytes: u64,
    /// Highest GPU memory of this process, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram_bytes: Option<u64>,
    /// Highest GPU memory in use on the device, all processes counted, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_vram_device_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<PromptOutcome>,
    /// The memory admission of each phase whose model was about to be loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admission: Vec<AdmissionReport>,
    /// How the video model generated the segment (segments by a real model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationReport>,
    /// The seams of a chained segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainReport>,
    /// Set when a VLM policy (`enhancePrompt.onFailure` or `releaseCheck`:
    /// Fail) failed this run: the issue it failed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_failure: Option<VlmIssue>,
    /// Output file, relative to the job's output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl RunReport {
    /// The model that produced this run's output, as people see it ([`crate::model_label`]).
    pub fn model_label(&self) -> String {
        crate::model_label(&self.model, self.preview)
    }

    /// What a TravelJob's status keeps of this report: the figures its
    /// status, conditions and columns are made of (peaks, the VLM's release,
    /// the prompts step's prompts, a policy failure, the output). The rest —
    /// the per-phase memory timeline, the admission records, how a segment
    /// was generated and its seams, the message the step's own status already
    /// shows — stays in the full report on the output volume, which the
    /// status names. Bounded: a job of 1000 segments keeps its status far
    /// below etcd's object limit.
    pub fn summary(&self) -> RunReport {
        RunReport {
            message: None,
            phases: Vec::new(),
            admission: Vec::new(),
            generation: None,
            chain: None,
            prompts: match self.step {
                StepId::Prompts => self.prompts.clone(),
                _ => Vec::new(),
            },
            warnings: self
                .warnings
                .iter()
                .take(SUMMARY_WARNINGS)
                .map(|w| shorten(w, SUMMARY_TEXT_BYTES))
                .collect(),
            ..self.clone()
        }
    }

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
        while !fits(&report)
            && (!report.prompts.is_empty()
                || !report.warnings.is_empty()
                || !report.admission.is_empty())
        {
            report.prompts.pop();
            report.warnings.pop();
            report.admission.pop();
        }
        serde_json::to_string(&report).expect("a report always serialises")
    }

    /// Reads a termination message back as a report: the whole message, or
    /// (when the kubelet fell back to the log tail) its last line that is a
    /// report. None when no report is there.
    pub fn from_termination_message(message: &str) -> Option<RunReport> {
        let message = message.trim();
        serde_json::from_str(message).ok().or_else(|| {
            message
                .lines()
                .rev()
                .find_map(|line| serde_json::from_str(line.trim()).ok())
        })
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
            step: StepId::Prompts,
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
