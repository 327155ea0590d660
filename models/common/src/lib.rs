//! Loading helpers shared by kubewan's candle models.
//!
//! Every model folder we read is a Hugging Face or diffusers layout on a
//! mounted volume: a `config.json` and either one `<stem>.safetensors` or
//! shards listed by `<stem>.safetensors.index.json`. These helpers turn such a
//! folder into a [`VarBuilder`] and report every problem with
//! the path it concerns, so a broken checkpoint is one readable error.

pub mod pil;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
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
    #[error("{path}: not a valid safetensors file: {what}")]
    Invalid { path: PathBuf, what: String },
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

/// The weights of `dir` (see [`safetensors_files`]) read into memory on
/// `device`, floats converted to `dtype`, as a VarBuilder.
///
/// Reads one tensor at a time with positioned reads instead of memory-mapping:
/// candle's mmap-backed VarBuilder keeps every mapped page resident (RssFile)
/// while it copies tensors out, so a CPU load would peak at twice the weights.
/// Here the peak is the weights plus one tensor (on a GPU: one tensor of host memory).
pub fn var_builder(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    let mut tensors = HashMap::new();
    for path in safetensors_files(dir, stem)? {
        read_safetensors(&path, dtype, device, &mut tensors)?;
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// candle's memory-mapped VarBuilder over the same files: for benchmarks that
/// compare load peaks, not for loading models.
pub fn mmap_var_builder(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    let files = safetensors_files(dir, stem)?;
    // SAFETY: the checkpoint volume is mounted read-only; files are not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|source| {
        LoadError::Safetensors {
            path: dir.to_owned(),
            source,
        }
    })
}

/// Reads every tensor of one safetensors file into `out`, validating the header
/// against the file (a truncated or mislabelled file is an error naming it).
pub fn read_safetensors(
    path: &Path,
    dtype: DType,
    device: &Device,
    out: &mut HashMap<String, Tensor>,
) -> Result<(), LoadError> {
    let invalid = |what: String| LoadError::Invalid {
        path: path.to_owned(),
        what,
    };
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0).map_err(read_err)?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > MAX_HEADER_BYTES {
        return Err(invalid(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(read_err)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("the header is not JSON: {e}")))?;
    let data_start = 8 + n;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry =
            serde_json::from_value(info).map_err(|e| invalid(format!("{name}: {e}")))?;
        let dt = safetensors_dtype(&entry.dtype)
            .ok_or_else(|| invalid(format!("{name}: unsupported dtype {}", entry.dtype)))?;
        let [begin, end] = entry.data_offsets;
        let expected = entry.shape.iter().product::<usize>() * dt.size_in_bytes();
        if end.checked_sub(begin) != Some(expected as u64) || data_start + end > len {
            return Err(invalid(format!(
                "{name}: bytes {begin}..{end} do not hold shape {:?} {dt:?} in a file of {len}",
                entry.shape
            )));
        }
        let mut buf = vec![0u8; expected];
        file.read_exact_at(&mut buf, data_start + begin)
            .map_err(read_err)?;
        let tensor = Tensor::from_raw_buffer(&buf, dt, &entry.shape, &Device::Cpu)
            .and_then(|t| {
                if dt.is_float() && dt != dtype {
                    t.to_dtype(dtype)
                } else {
                    Ok(t)
                }
            })
            .and_then(|t| t.to_device(device))
            .map_err(|source| LoadError::Safetensors {
                path: path.to_owned(),
                source,
            })?;
        out.insert(name, tensor);
    }
    Ok(())
}

/// Real safetensors headers are a few MB at most; a larger number means a corrupt file.
const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

fn safetensors_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_weights(dir: &Path) -> PathBuf {
        let tensors = HashMap::from([(
            "w".to_owned(),
            Tensor::arange(0f32, 6., &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        )]);
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    }

    #[test]
    fn reads_and_converts_a_safetensors_file() {
        let dir = std::env::temp_dir().join(format!("kubewan-common-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_weights(&dir);
        let vb = var_builder(&dir, "model", DType::F16, &Device::Cpu).unwrap();
        let w = vb.get((2, 3), "w").unwrap();
        assert_eq!(w.dtype(), DType::F16);
        assert_eq!(
            w.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [0., 1., 2., 3., 4., 5.]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_truncated_file_is_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("kubewan-common-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = write_weights(&dir);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let err = var_builder(&dir, "model", DType::F32, &Device::Cpu)
            .err()
            .expect("truncated file must fail")
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("do not hold shape"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
