//! Pure planning: a validated spec becomes a normalised [`Plan`] (frames 4N+1,
//! even capped overlaps, resolution snapped to 16) and a stage graph
//! (prompts → segments → stitch) that the operator and local mode both walk.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::{
    Dtype, LoraSpec, ReleaseCheckPolicy, Scheduler, TravelJobSpec, VlmFailurePolicy,
};
use crate::step::StepId;
use crate::validate::{ValidationErrors, validate};

/// Prompt used when neither the spec nor the VLM gives one.
pub const FALLBACK_PROMPT: &str = "cinematic transition";

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VlmPlan {
    /// Model folder relative to the checkpoints root.
    pub model: String,
    pub max_new_tokens: u32,
    /// What happens when the VLM cannot write a prompt.
    pub on_failure: VlmFailurePolicy,
    /// What a VLM that did not give its memory back does.
    pub release_check: ReleaseCheckPolicy,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentPlan {
    pub index: u32,
    /// Keyframe paths relative to the inputs volume.
    pub start_keyframe: String,
    pub end_keyframe: String,
    /// Frames of this segment (4N+1).
    pub frames: u32,
    /// Frames shared with the previous segment (0 for the first).
    pub overlap_before: u32,
    /// The segment's own prompt: used as is without the VLM, and as the VLM's fallback.
    pub prompt: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub seed: u64,
    pub steps: u32,
    pub guidance_scale: f64,
    /// The low-noise expert's guidance (Wan2.2); None: `guidance_scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale_2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_shift: Option<f64>,
    #[serde(default)]
    pub scheduler: Scheduler,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// The overall prompt (guides the VLM).
    pub prompt: String,
    pub chain: bool,
    pub parallelism: u32,
    /// Video model folder relative to the checkpoints root, or `preview`.
    pub video_model: String,
    pub dtype: Dtype,
    /// LoRA files relative to the checkpoints root, merged into the video model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraSpec>,
    /// Present when prompts are written by the VLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlm: Option<VlmPlan>,
    pub segments: Vec<SegmentPlan>,
    /// Frames of the stitched video: Σ frames − Σ overlaps.
    pub total_frames: u32,
}

/// Frames normalised down to 4N+1 (Wan compresses time 4×), at least 5.
pub fn normalise_frames(frames: u32) -> u32 {
    ((frames.max(5) - 1) / 4) * 4 + 1
}

/// Overlap rounded down to even and capped by both neighbours' frames (minus one,
/// so every segment keeps at least one frame of its own).
pub fn normalise_overlap(overlap: u32, prev_frames: u32, next_frames: u32) -> u32 {
    let even = overlap - overlap % 2;
    let cap = prev_frames.min(next_frames).saturating_sub(1);
    even.min(cap - cap % 2)
}

/// Parses "WIDTHxHEIGHT" (2 to 4 digits a side, as the CRD schema's pattern
/// says) and snaps each side down to a multiple of 16.
pub fn parse_resolution(text: &str) -> Option<(u32, u32)> {
    let side = |s: &str| (2..=4).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let (w, h) = text.split_once('x').filter(|(w, h)| side(w) && side(h))?;
    let (w, h): (u32, u32) = (w.parse().ok()?, h.parse().ok()?);
    let (w, h) = (w - w % 16, h - h % 16);
    (w > 0 && h > 0).then_some((w, h))
}

impl Plan {
    /// Validates the spec, then plans it: what the operator and local mode run.
    pub fn validated(spec: &TravelJobSpec) -> Result<Plan, ValidationErrors> {
        validate(spec)?;
        Ok(Plan::from_spec(spec))
    }

    /// Builds the plan of a spec that passed [`crate::validate::validate`].
    pub fn from_spec(spec: &TravelJobSpec) -> Plan {
        let (width, height) = parse_resolution(&spec.resolution).unwrap_or((832, 480));
        let frames = normalise_frames(spec.frames);
        let segment_count = spec.keyframes.len().saturating_sub(1) as u32;
        let segments: Vec<SegmentPlan> = (0..segment_count)
            .map(|i| {
                let own = spec
                    .prompts
                    .get(i as usize)
                    .map(|p| p.trim())
                    .filter(|p| !p.is_empty());
                let prompt = own
                    .or(Some(spec.prompt.trim()).filter(|p| !p.is_empty()))
                    .unwrap_or(FALLBACK_PROMPT);
                SegmentPlan {
                    index: i,
                    start_keyframe: spec.keyframes[i as usize].clone(),
                    end_keyframe: spec.keyframes[i as usize + 1].clone(),
                    frames,
                    overlap_before: if i == 0 {
                        0
                    } else {
                        normalise_overlap(spec.overlap, frames, frames)
                    },
                    prompt: prompt.to_owned(),
                }
            })
            .collect();
        let total_frames = segments.iter().map(|s| s.frames - s.overlap_before).sum();
        Plan {
            width,
            height,
            fps: spec.fps,
            seed: spec.seed,
            steps: spec.steps,
            guidance_scale: spec.guidance_scale,
            guidance_scale_2: spec.guidance_scale_2,
            flow_shift: spec.flow_shift,
            scheduler: spec.model.scheduler,
            negative_prompt: spec.negative_prompt.clone(),
            prompt: spec.prompt.clone(),
            chain: spec.chain,
            parallelism: spec.parallelism.max(1),
            video_model: spec.model.name.clone(),
            dtype: spec.model.dtype,
            loras: spec.model.loras.clone(),
            vlm: spec.enhance_prompt.enabled.then(|| VlmPlan {
                model: spec.enhance_prompt.model.clone(),
                max_new_tokens: spec.enhance_prompt.max_new_tokens,
                on_failure: spec.enhance_prompt.on_failure,
                release_check: spec.enhance_prompt.release_check,
            }),
            segments,
            total_frames,
        }
    }

    /// Every step of the job, in execution order.
    pub fn steps(&self) -> Vec<StepId> {
        let mut steps = Vec::with_capacity(self.segments.len() + 2);
        if self.vlm.is_some() {
            steps.push(StepId::Prompts);
        }
        steps.extend(self.segments.iter().map(|s| StepId::Segment(s.index)));
        steps.push(StepId::Stitch);
        steps
    }

    /// The steps that must have succeeded before `step` may start.
    pub fn dependencies(&self, step: StepId) -> Vec<StepId> {
        let prompts = self.vlm.is_some().then_some(StepId::Prompts);
        match step {
            StepId::Prompts => vec![],
            StepId::Segment(i) if self.chain && i > 0 => prompts
                .into_iter()
                .chain([StepId::Segment(i - 1)])
                .collect(),
            StepId::Segment(_) => prompts.into_iter().collect(),
            StepId::Stitch => self
                .segments
                .iter()
                .map(|s| StepId::Segment(s.index))
                .collect(),
        }
    }

    /// Steps that may start now: not done, not running, dependencies done, and
    /// (for segments) within `parallelism` running segments.
    pub fn ready_steps(&self, done: &BTreeSet<StepId>, running: &BTreeSet<StepId>) -> Vec<StepId> {
        let segment_slots = self.parallelism as usize;
        let mut running_segments = running
            .iter()
            .filter(|s| matches!(s, StepId::Segment(_)))
            .count();
        let mut ready = Vec::new();
        for step in self.steps() {
            if done.contains(&step) || running.contains(&step) {
                continue;
            }
            if !self.dependencies(step).iter().all(|d| done.contains(d)) {
                continue;
            }
            if let StepId::Segment(_) = step {
                if running_segments >= segment_slots {
                    continue;
                }
                running_segments += 1;
            }
            ready.push(step);
        }
        ready
    }

    /// The video model is the built-in preview.
    pub fn is_preview(&self) -> bool {
        self.video_model == crate::PREVIEW_MODEL
    }

    /// The video model as status and messages show it ([`crate::model_label`]).
    pub fn video_model_label(&self) -> String {
        crate::model_label(&self.video_model, self.is_preview())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TravelJobSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const BASE: &str = "keyframes: [a.png, b.png, c.png]\ncheckpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n";

    #[test]
    fn frames_are_4n_plus_1() {
        assert_eq!(normalise_frames(81), 81);
        assert_eq!(normalise_frames(80), 77);
        assert_eq!(normalise_frames(84), 81);
        assert_eq!(normalise_frames(1), 5);
    }

    #[test]
    fn overlaps_are_even_and_capped() {
        assert_eq!(normalise_overlap(16, 81, 81), 16);
        assert_eq!(normalise_overlap(17, 81, 81), 16);
        assert_eq!(normalise_overlap(40, 81, 9), 8);
        assert_eq!(normalise_overlap(0, 81, 81), 0);
    }

    #[test]
    fn resolution_snaps_to_16() {
        assert_eq!(parse_resolution("832x480"), Some((832, 480)));
        assert_eq!(parse_resolution("1281x719"), Some((1280, 704)));
        assert_eq!(parse_resolution("8x480"), None);
        assert_eq!(parse_resolution("wide"), None);
        assert_eq!(parse_resolution(" 832X480"), None);
        assert_eq!(parse_resolution("99999x480"), None);
    }

    #[test]
    fn three_keyframes_default_make_146_frames() {
        let plan = Plan::from_spec(&spec(BASE));
        assert_eq!(plan.segments.len(), 2);
        assert_eq!(plan.segments[1].overlap_before, 16);
        assert_eq!(plan.total_frames, 146);
        assert_eq!((plan.width, plan.height), (832, 480));
    }

    #[test]
    fn prompts_fall_back_from_segment_to_job_to_default() {
        let plan = Plan::from_spec(&spec(&format!("{BASE}prompts: ['', 'zoom out']\n")));
        assert_eq!(plan.segments[0].prompt, FALLBACK_PROMPT);
        assert_eq!(plan.segments[1].prompt, "zoom out");
        let plan = Plan::from_spec(&spec(&format!("{BASE}prompt: a walk\n")));
        assert_eq!(plan.segments[0].prompt, "a walk");
    }

    #[test]
    fn chained_graph_runs_prompts_then_segments_in_order_then_stitch() {
        let plan = Plan::from_spec(&spec(BASE));
        let mut done = BTreeSet::new();
        let none = BTreeSet::new();
        assert_eq!(plan.ready_steps(&done, &none), vec![StepId::Prompts]);
        done.insert(StepId::Prompts);
        assert_eq!(plan.ready_steps(&done, &none), vec![StepId::Segment(0)]);
        done.insert(StepId::Segment(0));
        assert_eq!(plan.ready_steps(&done, &none), vec![StepId::Segment(1)]);
        done.insert(StepId::Segment(1));
        assert_eq!(plan.ready_steps(&done, &none), vec![StepId::Stitch]);
    }

    #[test]
    fn parallel_graph_respects_parallelism() {
        let yaml = "keyframes: [a, b, c, d, e]\nchain: false\nparallelism: 2\nenhancePrompt: {enabled: false}\ncheckpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n";
        let plan = Plan::from_spec(&spec(yaml));
        let done = BTreeSet::new();
        assert_eq!(
            plan.ready_steps(&done, &BTreeSet::new()),
            vec![StepId::Segment(0), StepId::Segment(1)]
        );
        let running = BTreeSet::from([StepId::Segment(0)]);
        assert_eq!(plan.ready_steps(&done, &running), vec![StepId::Segment(1)]);
        assert_eq!(plan.dependencies(StepId::Stitch).len(), 4);
    }
}
