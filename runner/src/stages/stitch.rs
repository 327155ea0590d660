//! The stitch stage: streams every segment into the final video, crossfading
//! each overlap (see [`crate::video::stitch`]); CPU only, memory bounded by
//! one overlap of frames.

use anyhow::{Result, bail};
use kubewan_crds::report::RunReport;

use super::{FINAL_VIDEO, StageCtx, segment_video};
use crate::probe::phases;
use crate::video::stitch::{StitchInput, stitch};

pub fn run(ctx: &mut StageCtx<'_>, mut report: RunReport) -> Result<RunReport> {
    let plan = ctx.plan().clone();
    let mut inputs = Vec::new();
    let mut missing = Vec::new();
    for seg in &plan.segments {
        let path = ctx.job_file(&segment_video(seg.index));
        if !path.is_file() {
            missing.push(path.display().to_string());
        }
        inputs.push(StitchInput {
            path,
            overlap_before: seg.overlap_before,
        });
    }
    if !missing.is_empty() {
        bail!(
            "cannot stitch: segment videos missing: {}",
            missing.join(", ")
        );
    }
    ctx.probe.begin(phases::STITCH);
    let progress = ctx.progress;
    progress.start("stitch", plan.total_frames as u64);
    let out = ctx.job_file(FINAL_VIDEO);
    let frames = stitch(&inputs, &out, plan.fps, |_| progress.inc(1))?;
    ctx.probe.end();
    if frames != plan.total_frames {
        let _ = std::fs::remove_file(&out);
        bail!(
            "stitched {frames} frames but the plan expects {} (Σ frames − Σ overlaps); the segments do not match the plan",
            plan.total_frames
        );
    }
    report.ok = true;
    report.output = Some(FINAL_VIDEO.into());
    report.frames = Some(frames);
    report.message = Some(format!(
        "{frames} frames ({:.1}s at {} fps) by {}",
        frames as f64 / plan.fps as f64,
        plan.fps,
        report.model_label()
    ));
    Ok(report)
}
