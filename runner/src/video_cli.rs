//! `kubewan-runner video generate`: one Wan2.1 or Wan2.2 (two experts) video from the command
//! line, exactly as diffusers' `WanImageToVideoPipeline` (FLF2V when `--last` is given), for
//! parity checks (DESIGN.md "Developer-facing commands"). `--latents` reads the initial noise
//! (safetensors tensor `latents`, the tensor diffusers takes as `latents=`); `--out-frames` writes
//! safetensors tensor `frames`, f32 `[F,H,W,3]` in 0..1, the unrounded pipeline output
//! (`output_type="np"`); `--out` also writes an H.264 MP4 (frames rounded to 8 bits).
//!
//! Step-distilled runs: `--lora PATH[:SCALE]` merges a LoRA into `transformer` (Wan2.2: the
//! high-noise expert) and `--lora-2` into `transformer_2` (diffusers' `load_into_transformer_2`),
//! each repeatable; `--scheduler euler` swaps UniPC for flow-matching Euler; `--guidance 1` skips
//! the unconditional pass. `--guidance-2` is the low-noise expert's guidance (diffusers'
//! `guidance_scale_2`, default `--guidance`).
//!
//! Runs on `--device` (default auto: the first CUDA device when the build has CUDA and one is
//! visible, else the CPU) in `--dtype` (default f32, the parity setting; the VAE is always f32).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Subcommand};
use kubewan_model_common::device::DeviceChoice;
use kubewan_wan::checkpoint::Expert;
use kubewan_wan::lora::Lora;
use kubewan_wan::pipeline::{ExpertLoras, GuidancePasses, VideoRequest, WanPipeline};
use kubewan_wan::sampler::SamplerKind;

use kubewan_crds::limits;

use crate::fsutil::read_image;
use crate::video::Mp4Writer;
use crate::video::frames::{read_tensor, tensor_to_frames, write_frames_tensor};
use crate::vlm_cli::{DEVICE_ENV, parse_dtype};

/// The tensor of a `--latents` file.
const LATENTS_TENSOR: &str = "latents";

#[derive(Subcommand, Debug)]
pub enum VideoCommand {
    /// Generate a segment from a first (and optional last) frame.
    Generate(VideoGenerateArgs),
}

#[derive(Args, Debug)]
pub struct VideoGenerateArgs {
    /// Model folder (diffusers layout).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub first: PathBuf,
    #[arg(long)]
    pub last: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long)]
    pub frames: u32,
    #[arg(long)]
    pub width: u32,
    #[arg(long)]
    pub height: u32,
    #[arg(long)]
    pub steps: u32,
    /// Classifier-free guidance (of the high-noise expert on Wan2.2); 1 skips the unconditional pass.
    #[arg(long)]
    pub guidance: f64,
    /// Guidance of the low-noise expert (Wan2.2); default: --guidance.
    #[arg(long = "guidance-2")]
    pub guidance_2: Option<f64>,
    /// The sampler: unipc (the model's scheduler config) or euler (flow-matching Euler).
    #[arg(long, default_value = "unipc", value_parser = parse_sampler)]
    pub scheduler: SamplerKind,
    /// A LoRA merged into `transformer` while it loads: PATH[:SCALE] (scale 1.0 by default); repeatable.
    #[arg(long = "lora", value_name = "PATH[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<Lora>,
    /// A LoRA merged into `transformer_2`, the low-noise expert of a Wan2.2 model; repeatable.
    #[arg(long = "lora-2", value_name = "PATH[:SCALE]", value_parser = parse_lora)]
    pub loras_2: Vec<Lora>,
    /// Replaces the scheduler config's flow_shift.
    #[arg(long)]
    pub flow_shift: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Initial noise: safetensors tensor `latents`.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Output frames: safetensors tensor `frames`, f32 [F,H,W,3] in 0..1.
    #[arg(long)]
    pub out_frames: PathBuf,
    /// Also write the frames as an H.264 MP4.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Frame rate of `--out`.
    #[arg(long, default_value_t = 16)]
    pub fps: u32,
    /// Dtype of the DiT and the text/image encoders: f32 (parity), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// auto (CUDA when built with it and a GPU is visible), cpu, cuda or cuda:N.
    #[arg(long, env = DEVICE_ENV, default_value = "auto")]
    pub device: DeviceChoice,
}

fn parse_sampler(text: &str) -> std::result::Result<SamplerKind, String> {
    text.parse().map_err(|e: kubewan_wan::Error| e.to_string())
}

fn parse_lora(text: &str) -> std::result::Result<Lora, String> {
    Lora::parse(text).map_err(|e| e.to_string())
}

fn load_image(path: &Path) -> Result<image::RgbImage> {
    Ok(read_image(path)?.to_rgb8())
}

/// The arguments against the job limits ([`kubewan_crds::limits`]), before
/// anything is read or allocated.
fn check_args(args: &VideoGenerateArgs) -> Result<()> {
    let problems: Vec<String> = [
        ("--frames", limits::check_frames(args.frames)),
        (
            "--width/--height",
            limits::check_size(args.width, args.height),
        ),
        ("--steps", limits::check_steps(args.steps)),
        ("--guidance", limits::check_guidance(args.guidance)),
        (
            "--prompt",
            limits::check_text(&args.prompt, limits::MAX_PROMPT_BYTES),
        ),
        (
            "--negative-prompt",
            limits::check_text(
                args.negative_prompt.as_deref().unwrap_or(""),
                limits::MAX_NEGATIVE_PROMPT_BYTES,
            ),
        ),
        (
            "--flow-shift",
            match args.flow_shift {
                Some(s) if !(s.is_finite() && s > 0.0) => Err(format!("must be positive, got {s}")),
                _ => Ok(()),
            },
        ),
        (
            "--fps",
            if (1..=limits::MAX_FPS).contains(&args.fps) {
                Ok(())
            } else {
                Err(format!("must be between 1 and {}", limits::MAX_FPS))
            },
        ),
    ]
    .into_iter()
    .filter_map(|(flag, check)| check.err().map(|why| format!("{flag}: {why}")))
    .collect();
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    if !args.width.is_multiple_of(16) || !args.height.is_multiple_of(16) {
        bail!(
            "--width and --height must be multiples of 16 (got {}x{}), as the pipeline requires",
            args.width,
            args.height
        );
    }
    Ok(())
}

pub fn generate(args: &VideoGenerateArgs) -> Result<()> {
    check_args(args)?;
    let first = load_image(&args.first)?;
    let last = args.last.as_deref().map(load_image).transpose()?;
    let latents = args
        .latents
        .as_deref()
        .map(|path| read_tensor(path, LATENTS_TENSOR))
        .transpose()?;
    let device = args.device.resolve()?;
    let loras = ExpertLoras {
        high: args.loras.clone(),
        low: args.loras_2.clone(),
    };
    let pipe = WanPipeline::load(&args.model, parse_dtype(&args.dtype)?, &device, &loras)
        .with_context(|| format!("cannot load the Wan pipeline in {}", args.model.display()))?;
    for note in pipe.lora_notes() {
        eprintln!("warning: {note}");
    }
    let req = VideoRequest {
        first,
        last,
        known_frames: Vec::new(),
        width: args.width as usize,
        height: args.height as usize,
        frames: args.frames as usize,
        steps: args.steps as usize,
        guidance: args.guidance,
        guidance_2: args.guidance_2,
        sampler: args.scheduler,
        flow_shift: args.flow_shift,
        seed: args.seed.unwrap_or(0),
        latents,
        guidance_passes: GuidancePasses::Separate,
    };
    let (f, h, w) = req.adjusted();
    if f != req.frames {
        tracing::warn!(
            "{} frames rounded to {f} (4N+1), as diffusers does",
            req.frames
        );
    }
    if args.guidance_2.is_some() && !pipe.experts().contains(&Expert::Low) {
        bail!("--guidance-2 is the low-noise expert's guidance; this model has one transformer");
    }
    let frames = pipe.generate(&req, &args.prompt, args.negative_prompt.as_deref())?;
    let frames = frames.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    write_frames_tensor(&args.out_frames, &frames)?;
    println!(
        "wrote {} ({} frames {}x{})",
        args.out_frames.display(),
        f,
        w,
        h
    );
    if let Some(out) = &args.out {
        let mut writer = Mp4Writer::create(out, w as u32, h as u32, args.fps)?;
        for fr in tensor_to_frames(&frames)? {
            writer.write(&fr)?;
        }
        let n = writer.finish()?;
        println!("wrote {} ({n} frames)", out.display());
    }
    Ok(())
}

pub fn run(command: VideoCommand) -> Result<()> {
    match command {
        VideoCommand::Generate(args) => generate(&args),
    }
}
