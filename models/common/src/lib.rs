//! Loading helpers shared by kubewan's candle models.
//!
//! Every model folder we read is a Hugging Face or diffusers layout on a
//! mounted volume: a `config.json` and either one `<stem>.safetensors` or
//! shards listed by `<stem>.safetensors.index.json`. These helpers turn such a
//! folder into a memory-mapped [`VarBuilder`] and report every problem with
//! the path it concerns, so a broken checkpoint is one readable error.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

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
    #[error("{path}: weight shard listed in the index is missing")]
    MissingShard { path: PathBuf },
    #[error("{path}: not a readable safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        source: candle_core::Error,
    },
}

/// Reads and deserialises a JSON file (a `config.json`, a preprocessor config...).
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_owned(),
        what,
        source,
    })
}

/// The safetensors files holding a model's weights in `dir`, either the single
/// `<stem>.safetensors` or every shard named by `<stem>.safetensors.index.json`
/// (in a stable order, each listed once).
pub fn safetensors_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(format!("{stem}.safetensors.index.json"));
    if !index_path.is_file() {
        return Err(LoadError::NoWeights {
            dir: dir.to_owned(),
            stem: stem.to_owned(),
        });
    }
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = read_json(&index_path, "a safetensors index")?;
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    shards
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(LoadError::MissingShard { path })
            }
        })
        .collect()
}

/// Total size on disk of the given files, used to refuse a load that cannot fit in memory.
pub fn files_size(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Memory-maps the weights of `dir` (see [`safetensors_files`]) as a VarBuilder
/// that converts to `dtype` on `device` when a tensor is fetched.
pub fn var_builder(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    let files = safetensors_files(dir, stem)?;
    for path in &files {
        // Validate each header now, so a truncated or mislabelled file is reported by name.
        // SAFETY: the checkpoint volume is mounted read-only; files are not modified while mapped.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|source| {
            LoadError::Safetensors {
                path: path.clone(),
                source,
            }
        })?;
    }
    // SAFETY: as above.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|source| {
        LoadError::Safetensors {
            path: dir.to_owned(),
            source,
        }
    })
}
