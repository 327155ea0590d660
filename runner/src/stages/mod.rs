//! The pipeline stages (prompts, segment, stitch) as one runner invocation
//! runs them, in a pod (`run-task`) or in local mode. Every stage gets a
//! [`StageCtx`] and returns its [`RunReport`]; [`run`] wraps a stage with the
//! memory probe, the output-folder checks and the report files.
//!
//! The files a job's stages exchange through its output folder are named here,
//! in one place.

pub mod prompts;
pub mod segment;
pub mod segment_wan;
pub mod stitch;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kubewan_crds::report::RunReport;
use kubewan_crds::task::{Stage, Task};
use kubewan_crds::validate::check_relative_path;
use kubewan_crds::{PREVIEW_MODEL, Plan};

use crate::ckpts::{CkptRoot, ModelKind, ResolvedModel};
use crate::fsutil::ensure_writable_dir;
use crate::probe::{Probe, ProbeRecord, available_bytes, ensure_fits};
use crate::progress::Progress;
use crate::report::{fill_from_probe, write_outputs};
use crate::video::Frame;

/// The prompts stage's output: every segment's prompt (full text).
pub const PROMPTS_FILE: &str = "prompts.json";
/// Written next to `prompts.json` after the prompts stage succeeded: the
/// fingerprint of the plan the prompts were written for, so a segment never
/// uses prompts from an earlier, different version of the job.
pub const PROMPTS_PLAN_FILE: &str = "prompts.plan";
/// The final stitched video.
pub const FINAL_VIDEO: &str = "travel.mp4";

/// Segment `i`'s video.
pub fn segment_video(i: u32) -> String {
    format!("segment-{i}.mp4")
}

/// The last `overlap` frames of segment `i`, handed to segment `i + 1` in
/// chained mode: safetensors tensor `frames`, f32 `[overlap,H,W,3]` in 0..1.
pub fn segment_tail(i: u32) -> String {
    format!("segment-{i}.tail.safetensors")
}

/// A stable fingerprint (FNV-1a, hex) of what the prompts depend on: the
/// segments (keyframes, frames, own prompts), the overall prompt, fps and the VLM.
pub fn plan_fingerprint(plan: &Plan) -> String {
    let basis = serde_json::json!({
        "segments": plan.segments,
        "prompt": plan.prompt,
        "vlm": plan.vlm,
        "fps": plan.fps,
    });
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in basis.to_string().bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Where a stage finds its volumes.
#[derive(Clone, Debug)]
pub struct Mounts {
    pub ckpts: PathBuf,
    pub inputs: PathBuf,
    pub output: PathBuf,
}

/// Everything a stage may use.
pub struct StageCtx<'a> {
    pub task: &'a Task,
    pub mounts: &'a Mounts,
    /// The job's output folder (`<output volume>/<task.output_dir>`), writable.
    pub job_dir: PathBuf,
    pub probe: &'a mut Probe,
    pub progress: &'a dyn Progress,
}

impl StageCtx<'_> {
    pub fn plan(&self) -> &Plan {
        &self.task.plan
    }

    /// The checkpoint root, canonicalised.
    pub fn ckpts(&self) -> Result<CkptRoot> {
        CkptRoot::open(&self.mounts.ckpts)
    }

    /// Resolves and checks a model folder of `kind` under the checkpoint root,
    /// then refuses it when its weights do not fit the memory available
    /// (cgroup limit included): call it before loading any model.
    pub fn check_model(&self, reference: &str, kind: ModelKind) -> Result<ResolvedModel> {
        let model = self.ckpts()?.check(reference, Some(kind))?;
        ensure_fits(reference, model.weight_bytes, available_bytes())?;
        Ok(model)
    }

    /// A keyframe path (relative to the inputs volume), checked to stay inside it.
    pub fn keyframe_path(&self, rel: &str) -> Result<PathBuf> {
        resolve_input(&self.mounts.inputs, rel)
    }

    /// A keyframe loaded and resized (cover + centre crop) to the plan's resolution.
    pub fn load_keyframe(&self, rel: &str) -> Result<Frame> {
        let path = self.keyframe_path(rel)?;
        load_image_resized(&path, self.plan().width, self.plan().height)
    }

    pub fn job_file(&self, name: &str) -> PathBuf {
        self.job_dir.join(name)
    }
}

/// `rel` inside the inputs volume, refusing `..`, absolute paths and symlinks out of it.
pub fn resolve_input(inputs: &Path, rel: &str) -> Result<PathBuf> {
    if let Err(why) = check_relative_path(rel) {
        bail!("input {rel:?} {why}; inputs are relative to the inputs volume");
    }
    let root = std::fs::canonicalize(inputs)
        .with_context(|| format!("inputs folder {} does not exist", inputs.display()))?;
    let path = root.join(rel);
    let canonical = std::fs::canonicalize(&path)
        .with_context(|| format!("input image {} does not exist", path.display()))?;
    if !canonical.starts_with(&root) {
        bail!(
            "input {rel:?} resolves to {}, outside the inputs folder {}",
            canonical.display(),
            root.display()
        );
    }
    Ok(canonical)
}

/// Decodes an image (PNG or JPEG) and resizes it to cover `width`×`height`, centre-cropped.
pub fn load_image_resized(path: &Path, width: u32, height: u32) -> Result<Frame> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("image {} is corrupt or not a PNG/JPEG", path.display()))?;
    let resized = img.resize_to_fill(width, height, image::imageops::FilterType::Triangle);
    Ok(Frame {
        width,
        height,
        rgb: resized.to_rgb8().into_raw(),
    })
}

/// The outcome of one runner invocation.
pub struct StageOutcome {
    pub report: RunReport,
    pub record: ProbeRecord,
    /// Report and timeline files written to the job's output folder.
    pub files: Vec<PathBuf>,
}

/// The job's output folder for a task, checked to stay inside the output volume.
pub fn job_dir(task: &Task, output: &Path) -> Result<PathBuf> {
    if !task.output_dir.is_empty()
        && let Err(why) = check_relative_path(&task.output_dir)
    {
        bail!(
            "task outputDir {:?} {why}; it is relative to the output volume",
            task.output_dir
        );
    }
    Ok(output.join(&task.output_dir))
}

fn check_task(task: &Task) -> Result<()> {
    let plan = &task.plan;
    if plan.segments.is_empty() {
        bail!("the task's plan has no segments");
    }
    if plan.width == 0
        || plan.height == 0
        || !plan.width.is_multiple_of(2)
        || !plan.height.is_multiple_of(2)
    {
        bail!(
            "the task's plan has an unusable resolution {}x{}",
            plan.width,
            plan.height
        );
    }
    if plan.fps == 0 {
        bail!("the task's plan has fps 0");
    }
    if task.stage == Stage::Segment {
        let i = task
            .segment
            .context("a segment task needs its segment index")?;
        if plan.segments.get(i as usize).is_none() {
            bail!(
                "segment {i} is not in the plan ({} segments)",
                plan.segments.len()
            );
        }
    }
    Ok(())
}

/// Runs one stage: probe, output checks, the stage itself, report files. Never
/// panics on bad input: a failure comes back as a report with `ok: false`.
pub fn run(task: &Task, mounts: &Mounts, progress: &dyn Progress) -> StageOutcome {
    let mut probe = Probe::new();
    let preview = task.stage == Stage::Segment && task.plan.is_preview();
    let mut base = RunReport {
        stage: task.stage,
        segment: task.segment,
        model: match task.stage {
            Stage::Prompts => task
                .plan
                .vlm
                .as_ref()
                .map(|v| v.model.clone())
                .unwrap_or_default(),
            // The stitch uses no model; it stitches the video model's segments.
            Stage::Segment | Stage::Stitch => task.plan.video_model.clone(),
        },
        preview: preview || (task.stage == Stage::Stitch && task.plan.video_model == PREVIEW_MODEL),
        ..Default::default()
    };
    let mut dir_ok = None;
    let result = (|| -> Result<RunReport> {
        check_task(task)?;
        let dir = job_dir(task, &mounts.output)?;
        ensure_writable_dir(&dir)?;
        dir_ok = Some(dir.clone());
        let mut ctx = StageCtx {
            task,
            mounts,
            job_dir: dir,
            probe: &mut probe,
            progress,
        };
        match task.stage {
            Stage::Prompts => {
                // A rerun must not leave an older version's prompts marked current.
                let marker = ctx.job_file(PROMPTS_PLAN_FILE);
                if marker.exists() {
                    std::fs::remove_file(&marker)
                        .with_context(|| format!("cannot remove {}", marker.display()))?;
                }
                let report = prompts::run(&mut ctx, base.clone())?;
                crate::fsutil::write_atomic(&marker, plan_fingerprint(&task.plan).as_bytes())?;
                Ok(report)
            }
            Stage::Segment => segment::run(&mut ctx, base.clone()),
            Stage::Stitch => stitch::run(&mut ctx, base.clone()),
        }
    })();
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            base.ok = false;
            base.message = Some(format!("{e:#}"));
            base
        }
    };
    let record = probe.finish();
    fill_from_probe(&mut report, &record);
    let (files, problems) = write_outputs(&report, &record, dir_ok.as_deref());
    for p in problems {
        report.warnings.push(p);
    }
    StageOutcome {
        report,
        record,
        files,
    }
}
