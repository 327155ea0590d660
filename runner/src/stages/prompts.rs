//! The prompts stage: the VLM's memory admission, one VLM load for all
//! keyframe pairs, one prompt per segment, then the VLM is released (and the
//! release measured). When the VLM cannot write a prompt (refused, failed,
//! empty) `enhancePrompt.onFailure` decides: Fallback (that pair uses its
//! segment's own prompt, and the report says why, with a cause the
//! PromptsFellBack condition shows) or Fail (the step fails). A release that
//! did not give the memory back fails the step when `releaseCheck` is Fail.
//! Writes `prompts.json` (full texts) to the job's output folder; the segment
//! stage reads it (a segment without an entry uses its plan prompt).
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
use kubewan_crds::Plan;
use kubewan_crds::plan::{SegmentPlan, VlmPlan};
use kubewan_crds::report::{PromptOutcome, ReleaseReport, RunReport, VlmIssue};
use kubewan_crds::spec::{ReleaseCheckPolicy, VlmFailurePolicy};
use kubewan_model_common::device::compute_dtype;
use kubewan_qwen2_5_vl::{GenerateRequest, Qwen25Vl, Sampling};
use serde::{Deserialize, Serialize};

use super::{PROMPTS_FILE, StageCtx};
use crate::admission::qwen::{self, VlmShapes};
use crate::ckpts::ModelKind;
use crate::fsutil::{image_dimensions, read_image, read_text_bounded, write_atomic};
use crate::probe::phases;
use crate::vlm_cli::check_image_budget;

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
        // At most every segment's prompt with its reason, a few KiB each.
        let text = read_text_bounded(&path, 16 << 20)?;
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

/// One prompt the VLM wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub text: String,
    /// Tokens generated.
    pub tokens: u32,
}

/// What the VLM produced: one result per segment (in plan order) and the
/// measured release of the model.
pub struct VlmPrompts {
    pub prompts: Vec<Result<Written, String>>,
    pub release: Option<ReleaseReport>,
}

/// Why the VLM wrote no prompt at all.
#[derive(Clone, Debug, PartialEq)]
pub struct VlmDown {
    pub issue: VlmIssue,
    pub message: String,
}

impl VlmDown {
    fn failed(e: anyhow::Error) -> VlmDown {
        VlmDown {
            issue: VlmIssue::VlmFailed,
            message: format!("{e:#}"),
        }
    }
}

/// The shapes the VLM's admission is sized for: the largest pair's canvas
/// (read from the image headers) and the longest instruction.
fn vlm_shapes(ctx: &StageCtx<'_>, vlm: &VlmPlan, dtype: DType) -> Result<VlmShapes> {
    let plan = ctx.plan();
    let mut canvas = (0, 0);
    let mut text_bytes = 0;
    for seg in &plan.segments {
        let size = |rel: &str| -> Result<(u32, u32)> {
            let path = ctx.keyframe_path(rel)?;
            image_dimensions(&path).context("cannot size the VLM's keyframes")
        };
        let ((w1, h1), (w2, h2)) = (size(&seg.start_keyframe)?, size(&seg.end_keyframe)?);
        let pair = (w1 + w2, h1.max(h2));
        if u64::from(pair.0) * u64::from(pair.1) > u64::from(canvas.0) * u64::from(canvas.1) {
            canvas = pair;
        }
        text_bytes = text_bytes.max(instruction(&seg.prompt, seg.frames, plan.fps).len());
    }
    Ok(VlmShapes {
        canvas,
        text_bytes: SYSTEM_PROMPT.len() + text_bytes,
        max_new_tokens: vlm.max_new_tokens.max(1) as usize,
        dtype,
    })
}

/// Writes every segment's prompt with the VLM: check the folder, admit its
/// phases (`vlm_load`, `vlm_generate`: weights at the load dtype plus one
/// prompt's activations, see [`crate::admission::qwen`]), take a baseline
/// (`ctx.probe.sample()`), load once (phase `vlm_load`), generate per pair
/// (`vlm_generate`; keyframes via `ctx.keyframe_path`), then release and
/// measure (`ctx.probe.release("vlm_release", …, model, &baseline, &loaded)`,
/// which drops the model, returns the heap to the OS and reports
/// loaded/freed bytes with a warning under 95 %).
pub fn vlm_prompts(ctx: &mut StageCtx<'_>, vlm: &VlmPlan) -> Result<VlmPrompts, VlmDown> {
    let model_ref = ctx
        .check_model(&vlm.model, ModelKind::Qwen2_5Vl)
        .map_err(VlmDown::failed)?;
    let device = ctx.device.clone();
    let dtype = compute_dtype(&device, model_ref.weight_bytes);
    let shapes = vlm_shapes(ctx, vlm, dtype).map_err(VlmDown::failed)?;
    let needs = qwen::needs(&model_ref.dir, &shapes, &device).map_err(VlmDown::failed)?;
    ctx.admit(&model_ref, &needs, device.is_cuda())
        .map_err(|refusal| VlmDown {
            issue: VlmIssue::VlmRefused,
            message: refusal.to_string(),
        })?;
    let plan = ctx.plan().clone();
    let baseline = ctx.probe.sample();
    let model = ctx.probe.phase(phases::VLM_LOAD, || {
        Qwen25Vl::load(&model_ref.dir, dtype, &device)
    });
    let mut model = model
        .with_context(|| format!("cannot load the VLM {}", vlm.model))
        .map_err(VlmDown::failed)?;
    let loaded = ctx.probe.sample();
    ctx.probe.begin(phases::VLM_GENERATE);
    ctx.progress.start("prompts", plan.segments.len() as u64);
    let mut prompts = Vec::with_capacity(plan.segments.len());
    for seg in &plan.segments {
        let result = pair_prompt(
            ctx,
            &mut model,
            &model_ref.dir,
            seg,
            plan.fps,
            vlm.max_new_tokens,
        )
        .map_err(|e| format!("segment {}: {e:#}", seg.index));
        prompts.push(result);
        ctx.progress.inc(1);
    }
    ctx.progress.finish();
    ctx.probe.end();
    let release = ctx
        .probe
        .release(phases::VLM_RELEASE, &vlm.model, model, &baseline, &loaded);
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

/// The canvas shrunk (aspect kept) to at most
/// [`kubewan_crds::limits::MAX_VLM_IMAGE_PIXELS`], what the VLM may see.
fn fit_for_vlm(canvas: image::DynamicImage) -> image::DynamicImage {
    let pixels = u64::from(canvas.width()) * u64::from(canvas.height());
    let max = kubewan_crds::limits::MAX_VLM_IMAGE_PIXELS;
    if pixels <= max {
        return canvas;
    }
    let scale = (max as f64 / pixels as f64).sqrt();
    let (w, h) = (
        ((f64::from(canvas.width()) * scale) as u32).max(1),
        ((f64::from(canvas.height()) * scale) as u32).max(1),
    );
    canvas.resize(w, h, image::imageops::FilterType::Triangle)
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
    model_dir: &Path,
    seg: &SegmentPlan,
    fps: u32,
    max_new_tokens: u32,
) -> Result<Written> {
    let open = |rel: &str| -> Result<image::RgbImage> {
        let path = ctx.keyframe_path(rel)?;
        Ok(read_image(&path)?.to_rgb8())
    };
    let canvas = side_by_side(&open(&seg.start_keyframe)?, &open(&seg.end_keyframe)?);
    let images = vec![fit_for_vlm(image::DynamicImage::ImageRgb8(canvas))];
    check_image_budget(model_dir, &images)?;
    let out = model.generate(&GenerateRequest {
        system: Some(SYSTEM_PROMPT.to_owned()),
        images,
        prompt: instruction(&seg.prompt, seg.frames, fps),
        max_new_tokens: max_new_tokens.max(1) as usize,
        sampling: Sampling::Greedy,
    })?;
    Ok(Written {
        text: out.text,
        tokens: out.token_ids.len() as u32,
    })
}

/// Each segment's prompt: the VLM's, or (when it could not write one) the
/// segment's own prompt, marked as a fallback with its cause.
fn outcomes(
    plan: &Plan,
    written: Result<Vec<Result<Written, String>>, VlmDown>,
) -> Vec<PromptOutcome> {
    let fallback = |seg: &SegmentPlan, cause: VlmIssue, reason: String| PromptOutcome {
        segment: seg.index,
        prompt: seg.prompt.clone(),
        fell_back: true,
        reason: Some(reason),
        cause: Some(cause),
        tokens: None,
    };
    plan.segments
        .iter()
        .enumerate()
        .map(|(i, seg)| match &written {
            Err(down) => fallback(seg, down.issue, down.message.clone()),
            Ok(prompts) => match prompts.get(i) {
                Some(Ok(w)) if !w.text.trim().is_empty() => PromptOutcome {
                    segment: seg.index,
                    prompt: w.text.trim().to_owned(),
                    fell_back: false,
                    reason: None,
                    cause: None,
                    tokens: Some(w.tokens),
                },
                Some(Ok(_)) => fallback(
                    seg,
                    VlmIssue::EmptyPrompt,
                    "the VLM wrote an empty prompt".into(),
                ),
                Some(Err(why)) => fallback(seg, VlmIssue::VlmFailed, why.clone()),
                None => fallback(
                    seg,
                    VlmIssue::VlmFailed,
                    format!(
                        "the VLM returned {} prompts for {} segments",
                        prompts.len(),
                        plan.segments.len()
                    ),
                ),
            },
        })
        .collect()
}

/// What the policies make of the outcomes and the release: the issue that
/// fails the step (`onFailure: Fail` with a fallback, `releaseCheck: Fail`
/// with memory that did not come back), and why.
fn policy_failure(
    vlm: &VlmPlan,
    outcomes: &[PromptOutcome],
    release: Option<&ReleaseReport>,
) -> Option<(VlmIssue, String)> {
    if vlm.on_failure == VlmFailurePolicy::Fail
        && let Some(first) = outcomes.iter().find(|p| p.fell_back)
    {
        return Some((
            first.cause.unwrap_or(VlmIssue::VlmFailed),
            format!(
                "the VLM could not write the prompt of segment {} and enhancePrompt.onFailure is Fail: {}",
                first.segment,
                first.reason.as_deref().unwrap_or("no reason given")
            ),
        ));
    }
    if vlm.release_check == ReleaseCheckPolicy::Fail
        && let Some(warning) = release.and_then(|r| r.warning.as_deref())
    {
        return Some((
            VlmIssue::VlmNotReleased,
            format!("{warning}, and enhancePrompt.releaseCheck is Fail"),
        ));
    }
    None
}

pub fn run(ctx: &mut StageCtx<'_>, mut report: RunReport) -> Result<RunReport> {
    let plan = ctx.plan().clone();
    let Some(vlm) = plan.vlm.clone() else {
        bail!("the prompts stage runs only when enhancePrompt is enabled");
    };
    let (written, release) = match vlm_prompts(ctx, &vlm) {
        Ok(out) => (Ok(out.prompts), out.release),
        Err(down) => (Err(down), None),
    };
    let outcomes = outcomes(&plan, written);
    report.release = release;
    if let Some((issue, message)) = policy_failure(&vlm, &outcomes, report.release.as_ref()) {
        report.ok = false;
        report.policy_failure = Some(issue);
        report.message = Some(message);
        return Ok(report);
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

    fn plan(on_failure: VlmFailurePolicy, release_check: ReleaseCheckPolicy) -> Plan {
        let mut spec: kubewan_crds::TravelJobSpec = serde_saphyr::from_str(
            "keyframes: [a, b, c]\nprompts: [one, two]\ncheckpoints: {hostPath: {path: /c}}\ninputs: {hostPath: {path: /i}}\noutput: {volume: {hostPath: {path: /o}}}\n",
        )
        .unwrap();
        spec.enhance_prompt.on_failure = on_failure;
        spec.enhance_prompt.release_check = release_check;
        Plan::from_spec(&spec)
    }

    fn written(text: &str) -> Result<Written, String> {
        Ok(Written {
            text: text.into(),
            tokens: 7,
        })
    }

    #[test]
    fn each_prompt_is_the_vlms_or_a_fallback_with_its_cause() {
        let plan = plan(VlmFailurePolicy::Fallback, ReleaseCheckPolicy::Warn);
        let out = outcomes(&plan, Ok(vec![written(" a drone glides "), written("  ")]));
        assert_eq!(
            (out[0].prompt.as_str(), out[0].fell_back, out[0].tokens),
            ("a drone glides", false, Some(7))
        );
        assert_eq!(
            (out[1].prompt.as_str(), out[1].cause),
            ("two", Some(VlmIssue::EmptyPrompt))
        );
        let refused = VlmDown {
            issue: VlmIssue::VlmRefused,
            message: "refusing to load tiny/vlm for phase vlm_generate".into(),
        };
        let out = outcomes(&plan, Err(refused));
        assert!(
            out.iter()
                .all(|p| p.fell_back && p.cause == Some(VlmIssue::VlmRefused))
        );
        assert_eq!(out[0].prompt, "one");
        let short = outcomes(&plan, Ok(vec![written("x")]));
        assert_eq!(short[1].cause, Some(VlmIssue::VlmFailed));
        assert!(
            short[1]
                .reason
                .as_deref()
                .unwrap()
                .contains("1 prompts for 2 segments")
        );
    }

    #[test]
    fn the_policies_decide_what_fails_the_step() {
        let refused = |plan: &Plan| {
            outcomes(
                plan,
                Err(VlmDown {
                    issue: VlmIssue::VlmRefused,
                    message: "too big".into(),
                }),
            )
        };
        let leak = ReleaseReport {
            warning: Some("vlm was not released: RAM: only 1.0MiB of 100.0MiB came back".into()),
            ..Default::default()
        };
        let lenient = plan(VlmFailurePolicy::Fallback, ReleaseCheckPolicy::Warn);
        let vlm = lenient.vlm.as_ref().unwrap();
        assert_eq!(policy_failure(vlm, &refused(&lenient), Some(&leak)), None);
        let strict = plan(VlmFailurePolicy::Fail, ReleaseCheckPolicy::Fail);
        let vlm = strict.vlm.as_ref().unwrap();
        let (issue, why) = policy_failure(vlm, &refused(&strict), None).unwrap();
        assert_eq!(issue, VlmIssue::VlmRefused);
        assert!(why.contains("onFailure is Fail: too big"), "{why}");
        let fine = outcomes(&strict, Ok(vec![written("a"), written("b")]));
        let (issue, why) = policy_failure(vlm, &fine, Some(&leak)).unwrap();
        assert_eq!(issue, VlmIssue::VlmNotReleased);
        assert!(why.ends_with("releaseCheck is Fail"), "{why}");
        assert_eq!(policy_failure(vlm, &fine, None), None);
    }
}
