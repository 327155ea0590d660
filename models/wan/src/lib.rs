//! Wan2.1 image-to-video / first-last-frame-to-video on candle, loaded from the diffusers layout.
//!
//! Components: the DiT ([`transformer`]), the causal 3-D VAE ([`vae`]), causal conv3d
//! ([`conv3d`]) and the whole `WanImageToVideoPipeline` ([`pipeline`]).

pub mod clip;
pub mod conv3d;
pub mod pipeline;
pub mod scheduler;
pub mod text;
pub mod tiny;
pub mod transformer;
pub mod umt5;
pub mod vae;

pub use pipeline::{WanPipeline, required_files};
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
