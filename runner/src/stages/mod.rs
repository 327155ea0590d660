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
use candle_core::Device;
use kubewan_crds::hash::fnv1a;
use kubewan_crds::report::RunReport;
use kubewan_crds::task::Task;
use kubewan_crds::validate::validate_plan;
use kubewan_crds::{Plan, StepId};
use kubewan_model_common::device::{DeviceChoice, device_label};

use crate::admission::{Admission, PhaseNeed, Refusal};
use crate::ckpts::{CkptRoot, ModelKind, ResolvedModel};
use crate::fsutil::{check_disjoint, job_dir, read_image, resolve_inside};
use crate::probe::{Probe, ProbeRecord};
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
    format!("{:016x}", fnv1a(basis.to_string().as_bytes()))
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
    /// Where the stage's models compute (the CPU for stages that run none).
    pub device: Device,
    /// The memory admission of the models this stage loads.
    pub admission: &'a mut Admission,
}

impl StageCtx<'_> {
    pub fn plan(&self) -> &Plan {
        &self.task.plan
    }

    /// The checkpoint root, canonicalised.
    pub fn ckpts(&self) -> Result<CkptRoot> {
        CkptRoot::open(&self.mounts.ckpts)
    }

    /// Resolves and checks a model folder of `kind` under the checkpoint root.
    pub fn check_model(&self, reference: &str, kind: ModelKind) -> Result<ResolvedModel> {
        self.ckpts()?.check(reference, Some(kind))
    }

    /// Admits the phases `model` is about to be loaded for, or refuses them
    /// (see [`crate::admission`]): call it before loading the model.
    pub fn admit(
        &mut self,
        model: &ResolvedModel,
        phases: &[PhaseNeed],
        on_gpu: bool,
    ) -> std::result::Result<(), Refusal> {
        self.admission.check(&model.reference, phases, on_gpu)
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
    resolve_inside(inputs, "the inputs folder", rel)
}

/// Decodes an image (PNG or JPEG, by content) and resizes it to cover
/// `width`×`height`, centre-cropped.
pub fn load_image_resized(path: &Path, width: u32, height: u32) -> Result<Frame> {
    let img = read_image(path)?;
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

fn check_task(task: &Task) -> Result<()> {
    validate_plan(&task.plan).map_err(|e| anyhow::anyhow!("the task's plan is unusable: {e}"))?;
    if let StepId::Segment(i) = task.step
        && task.plan.segments.get(i as usize).is_none()
    {
        bail!(
            "{} is not in the plan ({} segments)",
            task.step,
            task.plan.segments.len()
        );
    }
    Ok(())
}

/// The device a task asks for: its pod's GPU when the pod requested one (the
/// first visible CUDA device), else the CPU.
pub fn device_for(task: &Task) -> DeviceChoice {
    if task.gpu {
        DeviceChoice::Cuda(0)
    } else {
        DeviceChoice::Cpu
    }
}

/// Whether the task runs a model (the VLM, a real video model), i.e. needs `device`.
fn runs_a_model(task: &Task) -> bool {
    match task.step {
        StepId::Prompts => true,
        StepId::Segment(_) => !task.plan.is_preview(),
        StepId::Stitch => false,
    }
}

/// Runs one stage on `device` ([`device_for`] in a pod; local mode may
/// override it): probe, output checks, the stage itself, report files. A
/// stage that runs a model fails at once when `device` cannot be used (a GPU
/// task on a runner built without CUDA, no visible GPU, an old driver), before
/// anything is loaded. Never panics on bad input: a failure comes back as a
/// report with `ok: false`.
pub fn run(
    task: &Task,
    mounts: &Mounts,
    device: DeviceChoice,
    progress: &dyn Progress,
) -> StageOutcome {
    let _span = tracing::info_span!("stage", job = %task.job, step = %task.step).entered();
    let mut probe = Probe::new();
    let mut base = RunReport {
        step: task.step,
        model: match task.step {
            StepId::Prompts => task
                .plan
                .vlm
                .as_ref()
                .map(|v| v.model.clone())
                .unwrap_or_default(),
            // The stitch uses no model; it stitches the video model's segments.
            StepId::Segment(_) | StepId::Stitch => task.plan.video_model.clone(),
        },
        preview: task.step != StepId::Prompts && task.plan.is_preview(),
        ..Default::default()
    };
    let mut dir_ok = None;
    let mut admission = Admission::new(task.memory_limit_bytes);
    let result = (|| -> Result<RunReport> {
        check_task(task)?;
        let device = if runs_a_model(task) {
            let device = device
                .resolve()
                .with_context(|| format!("cannot run the models on {device}"))?;
            base.device = Some(device_label(&device));
            probe.watch_device(&device);
            admission.watch_device(&device);
            device
        } else {
            Device::Cpu
        };
        check_disjoint(&mounts.output, &mounts.ckpts)?;
        let dir = job_dir(&mounts.output, &task.output_dir)?;
        dir_ok = Some(dir.clone());
        let mut ctx = StageCtx {
            task,
            mounts,
            job_dir: dir,
            probe: &mut probe,
            progress,
            device,
            admission: &mut admission,
        };
        match task.step {
            StepId::Prompts => {
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
            StepId::Segment(i) => segment::run(&mut ctx, i, base.clone()),
            StepId::Stitch => stitch::run(&mut ctx, base.clone()),
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
    report.admission = admission.into_reports();
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
