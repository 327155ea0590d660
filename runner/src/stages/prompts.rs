//! The prompts stage: one VLM load for all keyframe pairs, one prompt per
//! segment, then the VLM is released (and the release measured). On any VLM
//! failure a pair falls back to its segment's own prompt, and the report says
//! why. Writes `prompts.json` (full texts) to the job's output folder; the
//! segment stage reads it (a segment without an entry uses its plan prompt).
//!
//! Per pair the VLM sees the two keyframes side by side (left = start, right =
//! end, on one canvas of width w1 + w2 and height max(h1, h2)), a
//! video-direction system prompt, and an instruction that gives the segment's
//! duration (frames / fps) and its own prompt as guidance and asks for one
//! cinematic sentence of motion plus scene details. Decoding is greedy, so a
//! retried pod writes the same prompts.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::DType;
use kubewan_crds::plan::{SegmentPlan, VlmPlan};
use kubewan_crds::report::{PromptOutcome, ReleaseReport, RunReport};
use kubewan_qwen2_5_vl::{GenerateRequest, Qwen25Vl, Sampling};
use serde::{Deserialize, Serialize};

use super::{PROMPTS_FILE, StageCtx};
use crate::ckpts::ModelKind;
use crate::fsutil::write_atomic;

/// `prompts.json`: every segment's prompt, full text.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PromptsFile {
    pub prompts: Vec<PromptOutcome>,
}

impl PromptsFile {
    /// Reads `prompts.json` from a job folder; None when the stage did not run.
    pub fn read(job_dir: &Path) -> Result<Option<PromptsFile>> {
        let path = job_dir.join(PROMPTS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a prompts file", path.display()))?;
        Ok(Some(file))
    }

    /// The prompt written for segment `i`, if any.
    pub fn prompt_for(&self, i: u32) -> Option<&PromptOutcome> {
        self.prompts
            .iter()
            .find(|p| p.segment == i && !p.prompt.trim().is_empty())
    }
}

/// What the VLM produced: one result per segment (in plan order) and the
/// measured release of the model.
pub struct VlmPrompts {
    pub prompts: Vec<Result<String, String>>,
    pub release: Option<ReleaseReport>,
}

/// Writes every segment's prompt with the VLM: check the folder and the memory
/// (`ctx.check_model(&vlm.model, ModelKind::Qwen2_5Vl)`), take a baseline
/// (`ctx.probe.sample()`), load once (phase `vlm_load`), generate per pair
/// (`vlm_generate`; keyframes via `ctx.keyframe_path`), then release and
/// measure (`ctx.probe.release("vlm_release", …, model, &baseline, &loaded)`,
/// which drops the model, returns the heap to the OS and reports
/// loaded/freed bytes with a warning under 95 %).
pub fn vlm_prompts(ctx: &mut StageCtx<'_>, vlm: &VlmPlan) -> Result<VlmPrompts> {
    let model_ref = ctx.check_model(&vlm.model, ModelKind::Qwen2_5Vl)?;
    let device = crate::video_cli::device();
    // bf16 on a GPU (the released weights' dtype); on a CPU f32 for small
    // (tiny, test) checkpoints, bf16 for real ones so a 7B fits like on the GPU.
    let dtype = if device.is_cuda() || model_ref.weight_bytes > (2 << 30) {
        DType::BF16
    } else {
        DType::F32
    };
    let plan = ctx.plan().clone();
    let baseline = ctx.probe.sample();
    let model = ctx.probe.phase("vlm_load", || {
        Qwen25Vl::load(&model_ref.dir, dtype, &device)
    });
    let mut model = model.with_context(|| format!("cannot load the VLM {}", vlm.model))?;
    let loaded = ctx.probe.sample();
    ctx.probe.begin("vlm_generate");
    ctx.progress.start("prompts", plan.segments.len() as u64);
    let mut prompts = Vec::with_capacity(plan.segments.len());
    for seg in &plan.segments {
        let result = pair_prompt(ctx, &mut model, seg, plan.fps, vlm.max_new_tokens)
            .map_err(|e| format!("segment {}: {e:#}", seg.index));
        prompts.push(result);
        ctx.progress.inc(1);
    }
    ctx.progress.finish();
    ctx.probe.end();
    let release = ctx
        .probe
        .release("vlm_release", &vlm.model, model, &baseline, &loaded);
    Ok(VlmPrompts {
        prompts,
        release: Some(release),
    })
}

/// The system prompt of the prompts stage.
pub const SYSTEM_PROMPT: &str = "You are a video direction assistant. You write the prompt that an \
image-to-video model follows to animate the transition between two keyframes.";

/// The user instruction for one pair.
pub fn instruction(segment_prompt: &str, frames: u32, fps: u32) -> String {
    let seconds = frames as f64 / fps.max(1) as f64;
    let guide = if segment_prompt.trim().is_empty() {
        "a cinematic sequence"
    } else {
        segment_prompt.trim()
    };
    format!(
        "The image shows two keyframes side by side: the LEFT half is the first frame (the start) \
and the RIGHT half is the last frame (the end) of a {seconds:.1} second video clip.\n\
Describe how the scene moves from the start to the end in ONE cinematic sentence \
(camera movement and subject motion), then add a few details about the scene, the light and the style.\n\
Follow the user's idea: {guide}\n\
Examples:\n\
- The camera slowly pushes in as the woman turns toward the window; warm afternoon light, soft film grain.\n\
- A drone glides over the misty forest toward the mountain peak as the sun rises; cool blue tones, volumetric light.\n\
Answer with the prompt only."
    )
}

/// The two keyframes on one canvas: start on the left, end on the right (top-aligned, black fill).
pub fn side_by_side(start: &image::RgbImage, end: &image::RgbImage) -> image::RgbImage {
    let (w1, h1) = start.dimensions();
    let (w2, h2) = end.dimensions();
    let mut canvas = image::RgbImage::new(w1 + w2, h1.max(h2));
    image::imageops::replace(&mut canvas, start, 0, 0);
    image::imageops::replace(&mut canvas, end, w1 as i64, 0);
    canvas
}

fn pair_prompt(
    ctx: &StageCtx<'_>,
    model: &mut Qwen25Vl,
    seg: &SegmentPlan,
    fps: u32,
    max_new_tokens: u32,
) -> Result<String> {
    let open = |rel: &str| -> Result<image::RgbImage> {
        let path = ctx.keyframe_path(rel)?;
        Ok(image::open(&path)
            .with_context(|| format!("cannot read keyframe {}", path.display()))?
            .to_rgb8())
    };
    let canvas = side_by_side(&open(&seg.start_keyframe)?, &open(&seg.end_keyframe)?);
    let out = model.generate(&GenerateRequest {
        system: Some(SYSTEM_PROMPT.to_owned()),
        images: vec![image::DynamicImage::ImageRgb8(canvas)],
        prompt: instruction(&seg.prompt, seg.frames, fps),
        max_new_tokens: max_new_tokens.max(1) as usize,
        sampling: Sampling::Greedy,
    })?;
    Ok(out.text)
}

pub fn run(ctx: &mut StageCtx<'_>, mut report: RunReport) -> Result<RunReport> {
    let plan = ctx.plan().clone();
    let Some(vlm) = plan.vlm.clone() else {
        bail!("the prompts stage runs only when enhancePrompt is enabled");
    };
    let (results, release) = match vlm_prompts(ctx, &vlm) {
        Ok(out) => {
            if out.prompts.len() != plan.segments.len() {
                let why = format!(
                    "the VLM returned {} prompts for {} segments",
                    out.prompts.len(),
                    plan.segments.len()
                );
                (vec![Err(why); plan.segments.len()], out.release)
            } else {
                (out.prompts, out.release)
            }
        }
        Err(e) => (vec![Err(format!("{e:#}")); plan.segments.len()], None),
    };
    let mut outcomes = Vec::new();
    for (seg, result) in plan.segments.iter().zip(results) {
        outcomes.push(match result {
            Ok(text) if !text.trim().is_empty() => PromptOutcome {
                segment: seg.index,
                prompt: text.trim().to_owned(),
                fell_back: false,
                reason: None,
            },
            Ok(_) => PromptOutcome {
                segment: seg.index,
                prompt: seg.prompt.clone(),
                fell_back: true,
                reason: Some("the VLM wrote an empty prompt".into()),
            },
            Err(why) => PromptOutcome {
                segment: seg.index,
                prompt: seg.prompt.clone(),
                fell_back: true,
                reason: Some(why),
            },
        });
    }
    let file = PromptsFile {
        prompts: outcomes.clone(),
    };
    let json = serde_json::to_string_pretty(&file)?;
    write_atomic(&ctx.job_file(PROMPTS_FILE), json.as_bytes())?;
    let fell_back = outcomes.iter().filter(|p| p.fell_back).count();
    if fell_back > 0 {
        let reason = outcomes
            .iter()
            .find_map(|p| p.reason.clone())
            .unwrap_or_default();
        report.warnings.push(format!(
            "{fell_back} of {} prompts fell back to the segment's own prompt: {reason}",
            outcomes.len()
        ));
    }
    report.ok = true;
    report.release = release;
    report.prompts = outcomes;
    report.output = Some(PROMPTS_FILE.into());
    report.message = Some(format!(
        "{} prompts written ({} by the VLM, {fell_back} fell back)",
        plan.segments.len(),
        plan.segments.len() - fell_back
    ));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_pasted_left_start_right_end() {
        let a = image::RgbImage::from_pixel(4, 3, image::Rgb([255, 0, 0]));
        let b = image::RgbImage::from_pixel(2, 5, image::Rgb([0, 0, 255]));
        let c = side_by_side(&a, &b);
        assert_eq!(c.dimensions(), (6, 5));
        assert_eq!(c.get_pixel(0, 0), &image::Rgb([255, 0, 0]));
        assert_eq!(c.get_pixel(4, 4), &image::Rgb([0, 0, 255]));
        assert_eq!(c.get_pixel(0, 4), &image::Rgb([0, 0, 0]));
    }

    #[test]
    fn the_instruction_carries_duration_and_guidance() {
        let s = instruction("a fox runs", 81, 16);
        assert!(s.contains("5.1 second") && s.contains("a fox runs") && s.contains("LEFT"));
        assert!(instruction(" ", 33, 16).contains("a cinematic sequence"));
    }
}
