//! `kubewan-runner video generate`: one Wan2.1 segment from the command line,
//! for parity checks against diffusers' `WanImageToVideoPipeline` (DESIGN.md
//! "Developer-facing commands"). `--latents` reads the initial noise
//! (safetensors tensor `latents`); `--out-frames` writes safetensors tensor
//! `frames`, f32 `[F,H,W,3]` in 0..1 (see [`crate::video::frames`]).
//!
//! OWNERSHIP: the Wan engineers own this file's final content.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

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
}

pub fn run(command: VideoCommand) -> Result<()> {
    match command {
        VideoCommand::Generate(args) => {
            let _ = args;
            bail!("Wan2.1 video generation is not built yet")
        }
    }
}
