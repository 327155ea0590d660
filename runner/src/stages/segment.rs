//! The segment stage: one segment's video from its two keyframes (and, in
//! chained mode, the previous segment's tail frames), by the built-in preview
//! or by Wan2.1. Writes `segment-<i>.mp4` and, when the next segment is
//! chained to it, `segment-<i>.tail.safetensors`.

use anyhow::{Context, Result, bail};
use kubewan_crds::report::{PromptOutcome, RunReport};

use super::prompts::PromptsFile;
use super::segment_wan::{self, WanSegmentJob};
use super::{
    PROMPTS_FILE, PROMPTS_PLAN_FILE, StageCtx, plan_fingerprint, segment_tail, segment_video,
};
use crate::ckpts::ModelKind;
use crate::preview;
use crate::probe::phases;
use crate::video::frames::{read_frames_safetensors, write_frames_safetensors};
use crate::video::{Frame, Mp4Writer};

pub fn run(ctx: &mut StageCtx<'_>, mut report: RunReport) -> Result<RunReport> {
    let plan = ctx.plan().clone();
    let i = ctx
        .task
        .segment
        .context("a segment task needs its segment index")?;
    let seg = plan
        .segments
        .get(i as usize)
        .with_context(|| format!("segment {i} is not in the plan"))?
        .clone();

    // The prompt: written by the prompts stage for this very plan, else the segment's own.
    let written = if plan.vlm.is_some() {
        let marker = std::fs::read_to_string(ctx.job_file(PROMPTS_PLAN_FILE)).unwrap_or_default();
        let file = PromptsFile::read(&ctx.job_dir)?;
        if file.is_some() && marker.trim() != plan_fingerprint(&plan) {
            report.warnings.push(format!(
                "{PROMPTS_FILE} was not written for this version of the job; segment {i} uses its own prompt"
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
            fell_back: false,
            reason: None,
        });

    // Chained mode: the previous segment's last frames guide this one.
    let guide = if plan.chain && i > 0 && seg.overlap_before > 0 {
        let path = ctx.job_file(&segment_tail(i - 1));
        if !path.exists() {
            bail!(
                "segment {i} is chained to segment {} but its tail frames {} are missing (chained segments run in order)",
                i - 1,
                path.display()
            );
        }
        let frames = read_frames_safetensors(&path)?;
        if frames.len() != seg.overlap_before as usize
            || frames
                .iter()
                .any(|f| (f.width, f.height) != (plan.width, plan.height))
        {
            bail!(
                "{} holds {} frames of {}x{}, segment {i} needs {} of {}x{}",
                path.display(),
                frames.len(),
                frames.first().map(|f| f.width).unwrap_or(0),
                frames.first().map(|f| f.height).unwrap_or(0),
                seg.overlap_before,
                plan.width,
                plan.height
            );
        }
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
    let frames: Vec<Frame> = if plan.is_preview() {
        ctx.probe.begin(phases::VIDEO_LOAD);
        let start = ctx.load_keyframe(&seg.start_keyframe)?;
        let end = ctx.load_keyframe(&seg.end_keyframe)?;
        ctx.probe.begin(preview::PREVIEW_PHASE);
        progress.start(&format!("segment {i} (preview)"), seg.frames as u64);
        let out = preview::generate(&start, &end, seg.frames, guide.as_deref(), || {
            progress.inc(1)
        })?;
        ctx.probe.end();
        out
    } else {
        let model = ctx.check_model(&plan.video_model, ModelKind::Wan)?;
        let start_image = ctx.keyframe_path(&seg.start_keyframe)?;
        let end_image = ctx.keyframe_path(&seg.end_keyframe)?;
        let start = ctx.load_keyframe(&seg.start_keyframe)?;
        let end = ctx.load_keyframe(&seg.end_keyframe)?;
        let job = WanSegmentJob {
            index: i,
            model: &model,
            prompt: &used.prompt,
            negative_prompt: plan.negative_prompt.as_deref(),
            start_image,
            end_image,
            start: &start,
            end: &end,
            guide: guide.as_deref(),
            frames: seg.frames,
            width: plan.width,
            height: plan.height,
            steps: plan.steps,
            guidance_scale: plan.guidance_scale,
            flow_shift: plan.flow_shift,
            seed: plan.seed,
            dtype: plan.dtype,
        };
        let out = segment_wan::generate(ctx, &job)?;
        ctx.probe.end();
        out
    };
    drop(guide);
    if frames.len() != seg.frames as usize {
        bail!(
            "the model produced {} frames, segment {i} needs {}",
            frames.len(),
            seg.frames
        );
    }

    ctx.probe.begin(phases::ENCODE);
    let name = segment_video(i);
    let mut writer = Mp4Writer::create(&ctx.job_file(&name), plan.width, plan.height, plan.fps)?;
    progress.start(&format!("segment {i} encode"), frames.len() as u64);
    for f in &frames {
        writer.write(f)?;
        progress.inc(1);
    }
    let written_frames = writer.finish()?;
    if let Some(n) = keep_tail {
        let tail = &frames[frames.len() - n as usize..];
        write_frames_safetensors(&ctx.job_file(&segment_tail(i)), tail)?;
    }
    ctx.probe.end();

    report.ok = true;
    report.output = Some(name);
    report.frames = Some(written_frames);
    report.message = Some(format!(
        "segment {i}: {written_frames} frames {}x{}{}",
        plan.width,
        plan.height,
        if plan.is_preview() { " (preview)" } else { "" }
    ));
    report.prompts = vec![used];
    Ok(report)
}
