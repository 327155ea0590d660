//! Safetensors weights, parsed in one place: a file's header read and
//! validated without touching the tensor data ([`read_header`]), single
//! tensors read from an open file by name ([`SafetensorsFile`]), a weight
//! stem resolved to its files through the shard index ([`weight_files`],
//! [`safetensors_files`]), and the tensor-by-tensor loader built on them
//! ([`var_builder`], and [`var_builder_with`], which hands every tensor to a
//! transform as it is read: how LoRAs are merged while loading). The
//! checkpoint check and every model loader use these, so a file that passes
//! the check is one the loader can read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::{LoadError, read_json};

/// One tensor of a safetensors file, as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Where its bytes start in the file (header included).
    pub offset: u64,
    /// Its size in bytes: dtype size × shape product.
    pub len: u64,
}

impl TensorInfo {
    /// Bytes it takes once loaded with floats in `dtype` (other dtypes stay).
    pub fn loaded_bytes(&self, dtype: DType) -> u64 {
        if self.dtype.is_float() {
            self.len / self.dtype.size_in_bytes() as u64 * dtype.size_in_bytes() as u64
        } else {
            self.len
        }
    }
}

/// A validated safetensors header: every tensor fits in the file with the
/// byte length its dtype and shape need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsHeader {
    /// The tensors by name (`__metadata__` left out).
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Bytes of tensor data the header describes (the end of its last tensor).
    pub data_bytes: u64,
    /// The free-form string map under `__metadata__` (e.g. a LoRA's adapter settings).
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsHeader {
    /// Bytes the tensors take once loaded with floats in `dtype` (what a load
    /// in that dtype keeps resident; other tensors keep their own dtype).
    pub fn loaded_bytes(&self, dtype: DType) -> u64 {
        self.tensors.values().map(|t| t.loaded_bytes(dtype)).sum()
    }
}

/// Real safetensors headers are a few MB at most; a larger number means a corrupt file.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Reads and validates the header of the safetensors file `path` (see
/// [`SafetensorsHeader`]); the tensor data is not read.
pub fn read_header(path: &Path) -> Result<SafetensorsHeader, LoadError> {
    SafetensorsFile::open(path).map(|file| file.header)
}

/// The validated header of the open safetensors file `file` (named `path`
/// in errors), checked as the safetensors format requires: a JSON object
/// whose tensors have readable dtypes, integer dimensions whose byte size is
/// computed without overflow and equals their byte range, and byte ranges
/// that follow each other from the start of the data to its end, with no
/// gap, no overlap and nothing after the last.
pub fn parse_header(file: &File, path: &Path) -> Result<SafetensorsHeader, LoadError> {
    let invalid = |what: String| LoadError::Invalid {
        path: path.to_owned(),
        what,
    };
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let file_len = file.metadata().map_err(read_err)?.len();
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, 0)
        .map_err(|_| invalid(format!("only {file_len} bytes, shorter than its header")))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len == 0 || header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(invalid(format!(
            "a header of {header_len} bytes does not fit the file's {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(read_err)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("the header is not a JSON object: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut tensors = BTreeMap::new();
    let mut ranges = Vec::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(entry)
                .map_err(|e| invalid(format!("__metadata__ is not a map of strings: {e}")))?;
            continue;
        }
        let entry: HeaderEntry =
            serde_json::from_value(entry).map_err(|e| invalid(format!("tensor {name:?}: {e}")))?;
        let dtype = safetensors_dtype(&entry.dtype).ok_or_else(|| {
            invalid(format!(
                "tensor {name:?} has dtype {:?}, which the loader cannot read",
                entry.dtype
            ))
        })?;
        let [begin, end] = entry.data_offsets;
        // The byte size of the non-zero dimensions must be addressable even
        // when a zero dimension empties the tensor: its strides are their products.
        let extent = entry
            .shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(dtype.size_in_bytes() as u64, |n, &d| {
                n.checked_mul(d as u64)
            })
            .ok_or_else(|| {
                invalid(format!(
                    "tensor {name:?} has shape {:?}, too large to address",
                    entry.shape
                ))
            })?;
        let len = if entry.shape.contains(&0) { 0 } else { extent };
        if end.checked_sub(begin) != Some(len) {
            return Err(invalid(format!(
                "tensor {name:?} ({dtype:?} {:?}) spans bytes {begin}..{end}, it needs {len}",
                entry.shape
            )));
        }
        if end > data_len {
            return Err(invalid(format!(
                "truncated: tensor {name:?} needs {end} bytes of data, the file holds {data_len}"
            )));
        }
        ranges.push((begin, end, name.clone()));
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape: entry.shape,
                offset: data_start + begin,
                len,
            },
        );
    }
    let data_bytes = check_contiguous(ranges, data_len).map_err(invalid)?;
    Ok(SafetensorsHeader {
        tensors,
        data_bytes,
        metadata,
    })
}

/// The tensors' byte ranges, sorted, must tile `0..data_len` exactly;
/// returns `data_len`.
fn check_contiguous(mut ranges: Vec<(u64, u64, String)>, data_len: u64) -> Result<u64, String> {
    ranges.sort();
    let mut at = 0;
    let mut previous = "the start of the data";
    for (begin, end, name) in &ranges {
        if *begin != at {
            return Err(format!(
                "tensor {name:?} starts at byte {begin}, but {previous} ends at {at} ({})",
                if *begin < at { "they overlap" } else { "a gap" }
            ));
        }
        at = *end;
        previous = name;
    }
    if at != data_len {
        return Err(format!(
            "{} bytes follow the last tensor's data (it ends at {at} of {data_len})",
            data_len - at
        ));
    }
    Ok(at)
}

/// An open safetensors file with its validated header, from which tensors are
/// read one at a time (positioned reads: nothing else of the file is touched).
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    pub header: SafetensorsHeader,
}

impl SafetensorsFile {
    /// Opens `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, path)
    }

    /// Validates the header of the open file `file`, named `path` in errors
    /// (also how a file that lives in memory is read).
    pub fn from_file(file: File, path: &Path) -> Result<Self, LoadError> {
        let header = parse_header(&file, path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name` in its stored dtype, on the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor, LoadError> {
        let info = self
            .header
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::Invalid {
                path: self.path.clone(),
                what: format!("it has no tensor {name:?}"),
            })?;
        self.read(info)
    }

    fn read(&self, info: &TensorInfo) -> Result<Tensor, LoadError> {
        // The header fits the file, so `len` is below the file size and fits usize.
        let mut buf = vec![0u8; info.len as usize];
        self.file
            .read_exact_at(&mut buf, info.offset)
            .map_err(|source| LoadError::Read {
                path: self.path.clone(),
                source,
            })?;
        Tensor::from_raw_buffer(&buf, info.dtype, &info.shape, &Device::Cpu).map_err(|source| {
            LoadError::Safetensors {
                path: self.path.clone(),
                source,
            }
        })
    }
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The candle dtype of a safetensors dtype name, for the dtypes the loader reads.
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

/// The files that hold the weights `<stem>` of `dir` (a stem may name a
/// subfolder: `transformer/diffusion_pytorch_model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    /// `<stem>.safetensors.index.json`, when the weights are sharded.
    pub index: Option<PathBuf>,
    /// The single `<stem>.safetensors`, or every shard the index lists (each
    /// once, in a stable order); whether they exist is not checked.
    pub shards: Vec<PathBuf>,
}

/// Resolves the weights `<stem>` of `dir`: the single `<stem>.safetensors`
/// when it exists, else the shards named by `<stem>.safetensors.index.json`.
pub fn weight_files(dir: &Path, stem: &str) -> Result<WeightFiles, LoadError> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(WeightFiles {
            index: None,
            shards: vec![single],
        });
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
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = read_json(&index_path, "a safetensors index")?;
    let invalid = |what: String| LoadError::Invalid {
        path: index_path.clone(),
        what,
    };
    let names: BTreeSet<String> = index.weight_map.into_values().collect();
    if names.is_empty() {
        return Err(invalid("the index lists no shards".into()));
    }
    // Shards live next to their index; a name that leaves that folder is refused.
    let shard_dir = index_path.parent().unwrap_or(dir);
    let shards = names
        .into_iter()
        .map(|name| {
            if Path::new(&name)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
            {
                Ok(shard_dir.join(name))
            } else {
                Err(invalid(format!(
                    "shard {name:?} is not a file next to the index"
                )))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WeightFiles {
        index: Some(index_path),
        shards,
    })
}

/// The safetensors files holding the weights `<stem>` of `dir` (see
/// [`weight_files`]), each checked to exist.
pub fn safetensors_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, LoadError> {
    let files = weight_files(dir, stem)?;
    let missing: Vec<PathBuf> = files
        .shards
        .iter()
        .filter(|p| !p.is_file())
        .cloned()
        .collect();
    match (files.index, missing.is_empty()) {
        (Some(index), false) => Err(LoadError::MissingShards { index, missing }),
        _ => Ok(files.shards),
    }
}

/// The weights `<stem>` of `dir` (see [`safetensors_files`]) read into memory
/// on `device`, floats converted to `dtype`, as a VarBuilder.
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
    var_builder_with(dir, stem, dtype, device, &mut |_, tensor| Ok(tensor))
}

/// A change made to every tensor as it is loaded: it gets the tensor's name and
/// the tensor (floats in the load dtype, on the load device) and returns what
/// the model is built from under that name. It runs before the next tensor is
/// read, so the load's peak stays the weights plus one tensor (and whatever the
/// transform allocates for that one tensor).
pub type TensorTransform<'a, E> = dyn FnMut(&str, Tensor) -> Result<Tensor, E> + 'a;

/// [`var_builder`], with every tensor passed through `transform` as it is read
/// (e.g. a LoRA merge). Errors of the transform come back as they are.
pub fn var_builder_with<E: From<LoadError>>(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
    transform: &mut TensorTransform<'_, E>,
) -> Result<VarBuilder<'static>, E> {
    let mut tensors = HashMap::new();
    for path in safetensors_files(dir, stem)? {
        read_safetensors(&path, dtype, device, transform, &mut tensors)?;
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

/// Reads every tensor of one safetensors file into `out`, floats converted to
/// `dtype`, each passed through `transform`, after validating the header
/// against the file (a truncated or mislabelled file is an error naming it).
fn read_safetensors<E: From<LoadError>>(
    path: &Path,
    dtype: DType,
    device: &Device,
    transform: &mut TensorTransform<'_, E>,
    out: &mut HashMap<String, Tensor>,
) -> Result<(), E> {
    let file = SafetensorsFile::open(path)?;
    for (name, info) in &file.header.tensors {
        let tensor = to_load_dtype(file.read(info)?, dtype)
            .and_then(|t| t.to_device(device))
            .map_err(|source| LoadError::Safetensors {
                path: path.to_owned(),
                source,
            })?;
        out.insert(name.clone(), transform(name, tensor)?);
    }
    Ok(())
}

/// `tensor` with floats converted to `dtype`; integer tensors (token ids,
/// positions) keep their dtype.
fn to_load_dtype(tensor: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if tensor.dtype().is_float() && tensor.dtype() != dtype {
        tensor.to_dtype(dtype)
    } else {
        Ok(tensor)
    }
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

    /// A safetensors file with one tensor described by `entry` and `data` bytes of data.
    fn write_raw(path: &Path, entry: &str, data: usize) {
        let header = format!("{{\"w\":{entry}}}");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(path, bytes).unwrap();
    }

    fn header_error(entry: &str, data: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        write_raw(&path, entry, data);
        read_header(&path).unwrap_err().to_string()
    }

    #[test]
    fn reads_and_converts_a_safetensors_file() {
        let dir = tempfile::tempdir().unwrap();
        write_weights(dir.path());
        let vb = var_builder(dir.path(), "model", DType::F16, &Device::Cpu).unwrap();
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
    }

    #[test]
    fn the_transform_sees_every_tensor_in_the_load_dtype() {
        let dir = tempfile::tempdir().unwrap();
        write_weights(dir.path());
        let mut seen = Vec::new();
        let vb = var_builder_with(
            dir.path(),
            "model",
            DType::F64,
            &Device::Cpu,
            &mut |name: &str, t: Tensor| {
                seen.push((name.to_owned(), t.dtype()));
                t.affine(2.0, 1.0).map_err(|source| LoadError::Safetensors {
                    path: name.into(),
                    source,
                })
            },
        )
        .unwrap();
        assert_eq!(seen, [("w".to_owned(), DType::F64)]);
        let w = vb.get((2, 3), "w").unwrap().flatten_all().unwrap();
        assert_eq!(w.to_vec1::<f64>().unwrap(), [1., 3., 5., 7., 9., 11.]);
        // its error ends the load
        let err = var_builder_with(
            dir.path(),
            "model",
            DType::F32,
            &Device::Cpu,
            &mut |name: &str, _| {
                Err(LoadError::Invalid {
                    path: dir.path().into(),
                    what: format!("refused {name}"),
                })
            },
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("refused w"), "{err}");
    }

    #[test]
    fn metadata_and_single_tensors_are_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.safetensors");
        let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        for v in [0f32, 1., 2., 3.] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.header.metadata["format"], "pt");
        assert_eq!(
            file.tensor("a").unwrap().to_vec1::<f32>().unwrap(),
            [0., 1., 2., 3.]
        );
        assert_eq!(file.header.loaded_bytes(DType::BF16), 8);
        let err = file.tensor("b").unwrap_err().to_string();
        assert!(
            err.contains("lora.safetensors") && err.contains("\"b\""),
            "{err}"
        );
    }

    #[test]
    fn the_header_gives_every_tensor_and_the_data_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_weights(dir.path());
        let header = read_header(&path).unwrap();
        let w = &header.tensors["w"];
        assert_eq!(
            (w.dtype, w.shape.as_slice(), w.len),
            (DType::F32, &[2, 3][..], 24)
        );
        assert_eq!(header.data_bytes, 24);
        let file_len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(w.offset + w.len, file_len);
        // 6 f32 values: 12 bytes in bf16, 48 in f64
        assert_eq!(header.loaded_bytes(DType::BF16), 12);
        assert_eq!(header.loaded_bytes(DType::F64), 48);
    }

    #[test]
    fn a_truncated_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_weights(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let err = var_builder(dir.path(), "model", DType::F32, &Device::Cpu)
            .err()
            .expect("truncated file must fail")
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn mislabelled_headers_are_refused() {
        // 6 f32 need 24 bytes, not 20
        let err = header_error(r#"{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}"#, 24);
        assert!(err.contains("it needs 24"), "{err}");
        // a shape whose byte size overflows u64
        let err = header_error(
            r#"{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}"#,
            0,
        );
        assert!(err.contains("too large"), "{err}");
        // an empty tensor whose other dimensions do (candle's strides would overflow)
        let err = header_error(
            r#"{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}"#,
            0,
        );
        assert!(err.contains("too large"), "{err}");
        let err = header_error(r#"{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}"#, 2);
        assert!(err.contains("cannot read"), "{err}");
        let err = header_error(r#"{"dtype":"F32","shape":[2],"data_offsets":[8,0]}"#, 8);
        assert!(err.contains("spans bytes 8..0"), "{err}");
        let err = header_error(r#"{"dtype":"F32","shape":[2.5],"data_offsets":[0,10]}"#, 10);
        assert!(err.contains("expected usize"), "{err}");
        let err = header_error(r#"{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#, 12);
        assert!(err.contains("4 bytes follow the last tensor"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("picture.safetensors");
        std::fs::write(&path, b"\x89PNG\r\n\x1a\n not weights at all").unwrap();
        let err = read_header(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }

    #[test]
    fn tensors_must_tile_the_data_without_gaps_or_overlaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.safetensors");
        let write = |a: &str, b: &str, data: usize| {
            let header = format!(
                "{{\"a\":{{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":{a}}},\
                 \"b\":{{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":{b}}}}}"
            );
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend(std::iter::repeat_n(0u8, data));
            std::fs::write(&path, bytes).unwrap();
        };
        write("[0,8]", "[8,16]", 16);
        assert_eq!(read_header(&path).unwrap().data_bytes, 16);
        write("[0,8]", "[0,8]", 16);
        let err = read_header(&path).unwrap_err().to_string();
        assert!(err.contains("they overlap"), "{err}");
        write("[0,8]", "[12,20]", 20);
        let err = read_header(&path).unwrap_err().to_string();
        assert!(err.contains("a gap"), "{err}");
        // offsets near u64::MAX must not wrap into range
        write("[0,8]", "[18446744073709551615,7]", 16);
        assert!(read_header(&path).is_err());
    }

    #[test]
    fn shards_come_from_the_index_and_stay_next_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"weight_map":{"a":"model-2.safetensors","b":"model-1.safetensors","c":"model-2.safetensors"}}"#,
        )
        .unwrap();
        let files = weight_files(dir.path(), "model").unwrap();
        assert_eq!(files.index.as_deref(), Some(index.as_path()));
        assert_eq!(
            files.shards,
            [
                dir.path().join("model-1.safetensors"),
                dir.path().join("model-2.safetensors")
            ]
        );
        let err = safetensors_files(dir.path(), "model")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model-1.safetensors") && err.contains("model-2.safetensors"),
            "{err}"
        );
        std::fs::write(&index, r#"{"weight_map":{"a":"../elsewhere.safetensors"}}"#).unwrap();
        let err = weight_files(dir.path(), "model").unwrap_err().to_string();
        assert!(err.contains("not a file next to the index"), "{err}");
        std::fs::remove_file(&index).unwrap();
        let err = weight_files(dir.path(), "model").unwrap_err().to_string();
        assert!(err.contains("no weights found"), "{err}");
    }
}
