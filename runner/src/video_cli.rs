//! `kubewan-runner video generate`: one Wan2.1 video from the command line, exactly as
//! diffusers' `WanImageToVideoPipeline` (FLF2V when `--last` is given), for parity checks
//! (DESIGN.md "Developer-facing commands"). `--latents` reads the initial noise (safetensors
//! tensor `latents`, the tensor diffusers takes as `latents=`); `--out-frames` writes safetensors
//! tensor `frames`, f32 `[F,H,W,3]` in 0..1, the unrounded pipeline output
//! (`output_type="np"`); `--out` also writes an H.264 MP4 (frames rounded to 8 bits).
//!
//! Runs in f32 on the CPU (or the first CUDA device when the build has CUDA).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use kubewan_wan::pipeline::{VideoRequest, WanPipeline};

use crate::video::{Frame, Mp4Writer};

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
    #[arg(long)]
    pub guidance: f64,
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
}

fn load_image(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .to_rgb8())
}

fn load_latents(path: &Path) -> Result<Tensor> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    t.remove("latents").with_context(|| {
        format!(
            "{} has no tensor named \"latents\" (found: {})",
            path.display(),
            t.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })
}

/// `[F,H,W,3]` f32 in 0..1 -> RGB8 frames (`(x * 255).round()`, as diffusers' `numpy_to_pil`).
pub fn tensor_to_frames(frames: &Tensor) -> Result<Vec<Frame>> {
    let (f, h, w, c) = frames.dims4()?;
    if c != 3 {
        bail!(
            "frames tensor has shape {:?}, expected [F,H,W,3]",
            frames.dims()
        );
    }
    let v: Vec<f32> = frames
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    Ok(v.chunks(h * w * 3)
        .take(f)
        .map(|chunk| Frame {
            width: w as u32,
            height: h as u32,
            rgb: chunk
                .iter()
                .map(|x| (x * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect(),
        })
        .collect())
}

pub fn device() -> Device {
    Device::cuda_if_available(0).unwrap_or(Device::Cpu)
}

pub fn generate(args: &VideoGenerateArgs) -> Result<()> {
    let first = load_image(&args.first)?;
    let last = args.last.as_deref().map(load_image).transpose()?;
    let latents = args.latents.as_deref().map(load_latents).transpose()?;
    let device = device();
    let pipe = WanPipeline::load(&args.model, DType::F32, &device)
        .with_context(|| format!("cannot load the Wan pipeline in {}", args.model.display()))?;
    let req = VideoRequest {
        first,
        last,
        known_frames: Vec::new(),
        width: args.width as usize,
        height: args.height as usize,
        frames: args.frames as usize,
        steps: args.steps as usize,
        guidance: args.guidance,
        flow_shift: args.flow_shift,
        seed: args.seed.unwrap_or(0),
        latents,
    };
    if !args.width.is_multiple_of(16) || !args.height.is_multiple_of(16) {
        bail!(
            "--width and --height must be multiples of 16 (got {}x{}), as the pipeline requires",
            args.width,
            args.height
        );
    }
    let (f, h, w) = req.adjusted();
    if f != req.frames {
        eprintln!(
            "warning: {} frames rounded to {f} (4N+1), as diffusers does",
            req.frames
        );
    }
    let frames = pipe.generate(&req, &args.prompt, args.negative_prompt.as_deref())?;
    let frames = frames.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let mut map = HashMap::new();
    map.insert("frames".to_string(), frames.clone());
    candle_core::safetensors::save(&map, &args.out_frames)
        .with_context(|| format!("cannot write {}", args.out_frames.display()))?;
    eprintln!(
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
        eprintln!("wrote {} ({n} frames)", out.display());
    }
    Ok(())
}

pub fn run(command: VideoCommand) -> Result<()> {
    match command {
        VideoCommand::Generate(args) => generate(&args),
    }
}
