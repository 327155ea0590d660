//! The segment stage: one segment's video from its two keyframes (and, in
//! chained mode, the previous segment's tail frames, which become its first
//! frames as they are), by the built-in preview or by Wan2.1. Writes
//! `segment-<i>.mp4` and, when the next segment is chained to it,
//! `segment-<i>.tail.safetensors`; a chained segment's report carries digests
//! of both seams, so continuity can be checked without decoding video.

use anyhow::{Context, Result, bail};
use kubewan_crds::StepId;
use kubewan_crds::report::{ChainReport, PromptOutcome, RunReport};

use super::prompts::PromptsFile;
use super::segment_wan::{self, WanSegmentJob};
use super::{
    PROMPTS_FILE, PROMPTS_PLAN_FILE, StageCtx, plan_fingerprint, segment_tail, segment_video,
};
use crate::ckpts::ModelKind;
use crate::fsutil::read_text_bounded;
use crate::preview;
use crate::probe::phases;
use crate::video::frames::{
    FramesShape, frames_digest, read_frames_safetensors, write_frames_safetensors,
};
use crate::video::{Frame, Mp4Writer};

/// Generates segment `i`.
pub fn run(ctx: &mut StageCtx<'_>, i: u32, mut report: RunReport) -> Result<RunReport> {
    let plan = ctx.plan().clone();
    let step = StepId::Segment(i);
    let seg = plan
        .segments
        .get(i as usize)
        .with_context(|| format!("{step} is not in the plan"))?
        .clone();

    // The prompt: written by the prompts stage for this very plan, else the segment's own.
    let written = if plan.vlm.is_some() {
        let marker = read_text_bounded(&ctx.job_file(PROMPTS_PLAN_FILE), 1024).unwrap_or_default();
        let file = PromptsFile::read(&ctx.job_dir)?;
        if file.is_some() && marker.trim() != plan_fingerprint(&plan) {
            report.warnings.push(format!(
                "{PROMPTS_FILE} was not written for this version of the job; {step} uses its own prompt"
            ));
            None
        } else {
            file
        }
    } else {
        None
    };
    let used = written
        .as_ref()
        .and_then(|f| f.prompt_for(i).cloned())
        .unwrap_or_else(|| PromptOutcome {
            segment: i,
            prompt: seg.prompt.clone(),
            ..Default::default()
        });

    // Chained mode: the previous segment's last frames guide this one.
    let guide = if plan.chain && i > 0 && seg.overlap_before > 0 {
        let path = ctx.job_file(&segment_tail(i - 1));
        if !path.exists() {
            bail!(
                "{step} is chained to {} but its tail frames {} are missing (chained segments run in order)",
                StepId::Segment(i - 1),
                path.display()
            );
        }
        let expect = FramesShape {
            count: seg.overlap_before,
            width: plan.width,
            height: plan.height,
        };
        let frames = read_frames_safetensors(&path, expect).with_context(|| {
            format!("{step} cannot use the tail frames of the previous segment")
        })?;
        Some(frames)
    } else {
        None
    };
    let keep_tail = if plan.chain {
        plan.segments
            .get(i as usize + 1)
            .map(|s| s.overlap_before)
            .filter(|n| *n > 0)
    } else {
        None
    };

    let progress = ctx.progress;
    let mut frames: Vec<Frame> = if plan.is_preview() {
        ctx.probe.begin(phases::VIDEO_LOAD);
        let start = ctx.load_keyframe(&seg.start_keyframe)?;
        let end = ctx.load_keyframe(&seg.end_keyframe)?;
        ctx.probe.begin(preview::PREVIEW_PHASE);
        progress.start(
            &format!("{step} by {}", report.model_label()),
            seg.frames as u64,
        );
        let out = preview::generate(&start, &end, seg.frames, guide.as_deref(), || {
            progress.inc(1)
        })?;
        ctx.probe.end();
        out
    } else {
        let model = ctx.check_model(&plan.video_model, ModelKind::Wan)?;
        let loras = segment_wan::resolve_loras(&ctx.ckpts()?, &plan.loras)?;
        let start = ctx.load_keyframe(&seg.start_keyframe)?;
        let end = ctx.load_keyframe(&seg.end_keyframe)?;
        let job = WanSegmentJob {
            index: i,
            model: &model,
            prompt: &used.prompt,
            negative_prompt: plan.negative_prompt.as_deref(),
            start: &start,
            end: &end,
            guide: guide.as_deref(),
            frames: seg.frames,
            width: plan.width,
            height: plan.height,
            steps: plan.steps,
            guidance_scale: plan.guidance_scale,
            guidance_scale_2: plan.guidance_scale_2,
            scheduler: plan.scheduler,
            flow_shift: plan.flow_shift,
            seed: plan.seed,
            dtype: plan.dtype,
            loras: &loras,
            lora_labels: segment_wan::lora_labels(&plan.loras),
        };
        let out = segment_wan::generate(ctx, &job)?;
        ctx.probe.end();
        report.generation = Some(out.generation);
        report.warnings.extend(out.warnings);
        out.frames
    };
    if frames.len() != seg.frames as usize {
        bail!(
            "the model produced {} frames, {step} needs {}",
            frames.len(),
            seg.frames
        );
    }
    // Chained mode: the overlap IS the previous segment's tail. The model was
    // conditioned on those frames but reproduces them only approximately (a
    // VAE round trip, the model's own error); they are known, so they are
    // written as they are and the chain has no seam where it starts.
    let head_frames = guide.as_ref().map_or(0, |g| g.len());
    if let Some(g) = guide {
        frames.splice(..g.len(), g);
    }

    ctx.probe.begin(phases::ENCODE);
    let name = segment_video(i);
    let mut writer = Mp4Writer::create(&ctx.job_file(&name), plan.width, plan.height, plan.fps)?;
    progress.start(&format!("{step} encode"), frames.len() as u64);
    for f in &frames {
        writer.write(f)?;
        progress.inc(1);
    }
    let written_frames = writer.finish()?;
    let tail = keep_tail.map(|n| &frames[frames.len() - n as usize..]);
    if let Some(tail) = tail {
        write_frames_safetensors(&ctx.job_file(&segment_tail(i)), tail)?;
    }
    ctx.probe.end();
    if plan.chain {
        report.chain = Some(chain_report(&frames[..head_frames], tail));
    }

    report.ok = true;
    report.output = Some(name);
    report.frames = Some(written_frames);
    report.message = Some(format!(
        "{step}: {written_frames} frames {}x{} by {}",
        plan.width,
        plan.height,
        report.model_label()
    ));
    report.prompts = vec![used];
    Ok(report)
}

/// The seams of a chained segment: its first frames (the previous tail) and
/// the tail it hands on, as digests of their pixels.
fn chain_report(head: &[Frame], tail: Option<&[Frame]>) -> ChainReport {
    ChainReport {
        head_frames: head.len() as u32,
        head_digest: (!head.is_empty()).then(|| frames_digest(head)),
        tail_frames: tail.map_or(0, |t| t.len() as u32),
        tail_digest: tail.map(frames_digest),
    }
}
