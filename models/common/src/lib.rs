//! What kubewan's candle models share: reading a checkpoint folder (JSON
//! configs, safetensors weights, the catalogue of files a loader needs), the
//! layers both models are built from, the device and compute dtype,
//! Pillow-exact image resizing, and random weights for real-sized benchmarks.
//!
//! Every model folder we read is a Hugging Face or diffusers layout on a
//! mounted volume: a `config.json` and either one `<stem>.safetensors` or
//! shards listed by `<stem>.safetensors.index.json`. Problems are reported
//! with the path they concern, so a broken checkpoint is one readable error.
//!
//! Linking this crate sets the process's global allocator: the system's, which
//! also knows the weights adopted from mapped checkpoint files (`mapped.rs`).

pub mod activation;
pub mod bias_gemm;
pub mod checkpoint;
pub mod device;
pub mod fuzzing;
mod mapped;
pub mod nn;
pub mod parallel;
pub mod pil;
pub mod random;
pub mod rows;
pub mod safetensors;
pub mod small_batch;
mod tiled_attention;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use safetensors::{mmap_var_builder, safetensors_files, var_builder};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        source: serde_json::Error,
    },
    #[error(
        "{dir}: no weights found: looked for {stem}.safetensors and {stem}.safetensors.index.json"
    )]
    NoWeights { dir: PathBuf, stem: String },
    #[error("{index} lists weight shards that are missing: {}", paths(missing))]
    MissingShards {
        index: PathBuf,
        missing: Vec<PathBuf>,
    },
    #[error("{dir}: the model folder is incomplete: {}", problems.join("; "))]
    Incomplete { dir: PathBuf, problems: Vec<String> },
    #[error("{path}: not a valid safetensors file: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: not a readable safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        source: candle_core::Error,
    },
}

fn paths(list: &[PathBuf]) -> String {
    list.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// JSON files of a model folder (configs, indexes) are far smaller.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// Reads and deserialises a JSON file (a `config.json`, a preprocessor
/// config...): a regular file (opened without blocking, so a FIFO is refused,
/// not waited on) of at most 64 MiB.
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<T, LoadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() || meta.len() > MAX_JSON_BYTES {
        return Err(read_err(std::io::Error::other(format!(
            "not a regular file of at most {MAX_JSON_BYTES} bytes"
        ))));
    }
    let mut text = String::new();
    file.take(MAX_JSON_BYTES)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_owned(),
        what,
        source,
    })
}

/// What the kernels' unit tests share.
#[cfg(test)]
mod test_support {
    use candle_core::Tensor;

    /// The largest |a − b| of two tensors of one shape.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
