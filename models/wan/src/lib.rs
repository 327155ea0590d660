//! Wan image-to-video / first-last-frame-to-video on candle, loaded from the diffusers layout:
//! Wan2.1 and Wan2.2 I2V-A14B (two experts switched at a boundary timestep).
//!
//! Components: the DiT ([`transformer`]) with LoRAs merged while it loads ([`lora`]), the causal
//! 3-D VAE ([`vae`]), causal conv3d ([`conv3d`]), the UMT5 text encoder ([`umt5`], prompts in
//! [`text`]), the CLIP image encoder ([`clip`]), the flow UniPC ([`scheduler`]) and Euler
//! ([`euler`]) samplers behind one interface ([`sampler`]), and the whole
//! `WanImageToVideoPipeline` ([`pipeline`]); [`checkpoint`] lists every file they read from a
//! diffusers folder.

pub mod checkpoint;
pub mod clip;
pub mod conv3d;
pub mod euler;
pub mod lora;
pub mod pipeline;
pub mod sampler;
pub mod scheduler;
pub mod text;
pub mod tiny;
pub mod transformer;
pub mod umt5;
pub mod vae;

pub use pipeline::WanPipeline;
pub use tiny::write_tiny_checkpoint;

use std::path::{Path, PathBuf};

/// Errors of this crate: a loading problem (with the path it concerns) or a tensor error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] kubewan_model_common::LoadError),
    #[error("{path}: {source}")]
    Model {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("LoRA {path}: {what}")]
    Lora { path: PathBuf, what: String },
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn model(path: &Path, source: candle_core::Error) -> Self {
        Self::Model {
            path: path.to_owned(),
            source,
        }
    }
    pub fn msg(s: impl Into<String>) -> Self {
        Self::Msg(s.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
