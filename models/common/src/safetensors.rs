//! Safetensors weights, parsed in one place: a file's header read and
//! validated without touching the tensor data ([`read_header`]), single
//! tensors read from an open file by name ([`SafetensorsFile`]), a weight
//! stem resolved to its files through the shard index ([`weight_files`],
//! [`safetensors_files`]), and the tensor-by-tensor loader built on them
//! ([`var_builder`], and [`var_builder_with`], which hands every tensor to a
//! transform as it is read: how LoRAs are merged while loading; CPU tensors
//! kept in their stored dtype are adopted from the mapped file instead, see
//! [`crate::mapped`]). The
//! checkpoint check and every model loader use these, so a file that passes
//! the check is one the loader can read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use half::{bf16, f16};

use crate::mapped::MappedFile;
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
/// read one at a time (positioned reads: nothing else of the file is touched),
/// or, once [`Self::map`]ped, adopted from the file's pages where they are
/// loaded in the dtype they are stored in.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    mapped: Option<MappedFile>,
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
            mapped: None,
            header,
        })
    }

    /// Maps the file so that the tensors loaded from it in their stored dtype
    /// are its pages (see [`crate::mapped`]); where it cannot be mapped, they
    /// are read into memory like the others.
    fn map(&mut self) {
        self.mapped = self
            .file
            .metadata()
            .ok()
            .and_then(|meta| MappedFile::map(&self.file, meta.len()));
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
        self.load(info, info.dtype, &mut Reader::new())
    }

    /// The tensor `info` of this file on the CPU, floats in `dtype` (other
    /// tensors keep their dtype), read by `reader` (see [`Reader`]).
    fn load(
        &self,
        info: &TensorInfo,
        dtype: DType,
        reader: &mut Reader,
    ) -> Result<Tensor, LoadError> {
        let target = if info.dtype.is_float() {
            dtype
        } else {
            info.dtype
        };
        let source = Source {
            file: &self.file,
            mapped: self.mapped.as_ref(),
        };
        reader.load(source, info, target).map_err(|e| match e {
            ReadError::Io(source) => LoadError::Read {
                path: self.path.clone(),
                source,
            },
            ReadError::Candle(source) => LoadError::Safetensors {
                path: self.path.clone(),
                source,
            },
        })
    }
}

/// Source bytes one worker reads (and, when the dtype changes, converts) at a
/// time: a tensor larger than this is read in chunks of it by several threads.
const CHUNK_BYTES: usize = 8 << 20;

/// How far ahead of the tensor being read the kernel is asked to read the file.
const READ_AHEAD_BYTES: u64 = 64 << 20;

/// Asks the kernel to read `file` from `*ahead` to `to` into the page cache in
/// the background (POSIX_FADV_WILLNEED: the disk works on the next tensors
/// while this one is copied and converted) and advances `*ahead`, in steps of
/// at least a quarter of [`READ_AHEAD_BYTES`]. Only a hint: errors are ignored.
fn read_ahead(file: &File, ahead: &mut u64, to: u64) {
    use std::os::fd::AsRawFd;
    if to < *ahead + READ_AHEAD_BYTES / 4 {
        return;
    }
    // SAFETY: a valid open descriptor; the advice reads pages, it changes nothing.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            *ahead as libc::off_t,
            (to - *ahead) as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
    *ahead = to;
}

/// The threads that read a large tensor: the cores, at least 2 (so that one
/// thread's read overlaps another's conversion or page faults) and at most 8.
fn read_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

enum ReadError {
    Io(std::io::Error),
    Candle(candle_core::Error),
}

/// Where a tensor's bytes come from: the open file, and its mapping when the
/// file is mapped.
#[derive(Clone, Copy)]
struct Source<'a> {
    file: &'a File,
    mapped: Option<&'a MappedFile>,
}

/// Reads tensors straight into the memory candle keeps: the bytes of a tensor
/// whose dtype stays are read (positioned reads) into its final buffer, and
/// a tensor converted between f32, bf16 and f16 is read a chunk at a time into
/// a scratch buffer of [`CHUNK_BYTES`] per thread and converted from there into
/// its final buffer, with the same conversions candle's `to_dtype` makes (so
/// the values are bit-identical to reading the tensor and converting it). A
/// tensor larger than a chunk is spread over [`read_threads`] threads. What it
/// holds besides the tensors: the scratch buffers, allocated on the first
/// conversion and kept for the next tensors.
struct Reader {
    threads: usize,
    /// [`CHUNK_BYTES`] (smaller in tests, to cross chunk boundaries with little data).
    chunk_bytes: usize,
    scratch: Vec<Vec<u64>>,
}

impl Reader {
    fn new() -> Self {
        Self::with(read_threads(), CHUNK_BYTES)
    }

    /// `chunk_bytes` must be a multiple of 8 (every element size divides it).
    fn with(threads: usize, chunk_bytes: usize) -> Self {
        assert!(threads > 0 && chunk_bytes > 0 && chunk_bytes.is_multiple_of(8));
        Self {
            threads,
            chunk_bytes,
            scratch: Vec::new(),
        }
    }

    fn load(
        &mut self,
        source: Source,
        info: &TensorInfo,
        target: DType,
    ) -> Result<Tensor, ReadError> {
        use DType::{BF16, F16, F32};
        // The header fits the file, so `len` is below the file size and fits usize.
        let len = info.len as usize;
        let shape = info.shape.as_slice();
        match (info.dtype, target) {
            (from, to) if from == to => match from {
                F32 => self.direct::<f32>(source, info.offset, len, shape),
                BF16 => self.direct::<bf16>(source, info.offset, len, shape),
                F16 => self.direct::<f16>(source, info.offset, len, shape),
                DType::F64 => self.direct::<f64>(source, info.offset, len, shape),
                DType::I64 => self.direct::<i64>(source, info.offset, len, shape),
                DType::I32 => self.direct::<i32>(source, info.offset, len, shape),
                DType::I16 => self.direct::<i16>(source, info.offset, len, shape),
                DType::U32 => self.direct::<u32>(source, info.offset, len, shape),
                DType::U8 => self.direct::<u8>(source, info.offset, len, shape),
                _ => self.via_candle(source.file, info, target),
            },
            // The conversions of candle's CPU `to_dtype` (candle-core's cpu_backend).
            (BF16, F32) => {
                self.converted(source.file, info.offset, len, shape, |v: bf16| v.to_f32())
            }
            (F16, F32) => self.converted(source.file, info.offset, len, shape, |v: f16| v.to_f32()),
            (F32, BF16) => self.converted(source.file, info.offset, len, shape, bf16::from_f32),
            (F16, BF16) => self.converted(source.file, info.offset, len, shape, |v: f16| {
                bf16::from_f32(v.to_f32())
            }),
            (F32, F16) => self.converted(source.file, info.offset, len, shape, f16::from_f32),
            (BF16, F16) => self.converted(source.file, info.offset, len, shape, |v: bf16| {
                f16::from_f32(v.to_f32())
            }),
            _ => self.via_candle(source.file, info, target),
        }
    }

    /// A tensor in its stored dtype `T`: adopted from the file's mapping, or
    /// its bytes read into its buffer.
    fn direct<T: Plain>(
        &mut self,
        source: Source,
        offset: u64,
        len: usize,
        shape: &[usize],
    ) -> Result<Tensor, ReadError> {
        let adopted = source
            .mapped
            .and_then(|mapped| mapped.adopt::<T>(offset, len, self.threads));
        let data = match adopted {
            Some(data) => data,
            None => self.read_into_memory(source.file, offset, len)?,
        };
        Tensor::from_vec(data, shape, &Device::Cpu).map_err(ReadError::Candle)
    }

    /// The `len` bytes at `offset` of `file` read into a new buffer of `T`s.
    fn read_into_memory<T: Plain>(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Result<Vec<T>, ReadError> {
        let mut data = zeroed_vec::<T>(len / std::mem::size_of::<T>());
        let chunk = self.chunk_bytes / std::mem::size_of::<T>();
        let threads = self.threads;
        in_parallel(
            threads,
            data.chunks_mut(chunk).enumerate(),
            |(i, dst): (usize, &mut [T])| {
                let at = offset + (i * chunk * std::mem::size_of::<T>()) as u64;
                let dst = as_bytes_mut(dst);
                populate(dst);
                file.read_exact_at(dst, at)
            },
        )
        .map_err(ReadError::Io)?;
        Ok(data)
    }

    /// A tensor stored as `S`, converted element by element with `convert`
    /// into a buffer of `D`.
    fn converted<S: Plain, D: Plain>(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
        shape: &[usize],
        // generic, not a fn pointer: inlined into the loop, which then vectorises
        convert: impl Fn(S) -> D + Sync,
    ) -> Result<Tensor, ReadError> {
        let n = len / std::mem::size_of::<S>();
        let mut data = zeroed_vec::<D>(n);
        let chunk = self.chunk_bytes / std::mem::size_of::<S>();
        let workers = self.threads.min(n.div_ceil(chunk).max(1));
        while self.scratch.len() < workers {
            self.scratch.push(Vec::new());
        }
        for s in &mut self.scratch[..workers] {
            if s.is_empty() {
                *s = vec![0u64; self.chunk_bytes / 8];
            }
        }
        let work = std::sync::Mutex::new(data.chunks_mut(chunk).enumerate());
        let job = |scratch: &mut Vec<u64>| -> std::io::Result<()> {
            loop {
                let Some((i, dst)) = work.lock().unwrap_or_else(|e| e.into_inner()).next() else {
                    return Ok(());
                };
                let src = &mut as_plain_mut::<S>(scratch)[..dst.len()];
                let at = offset + (i * chunk * std::mem::size_of::<S>()) as u64;
                file.read_exact_at(as_bytes_mut(src), at)?;
                populate(as_bytes_mut(dst));
                for (d, s) in dst.iter_mut().zip(src.iter()) {
                    *d = convert(*s);
                }
            }
        };
        let (first, rest) = self.scratch[..workers].split_at_mut(1);
        std::thread::scope(|scope| {
            let others: Vec<_> = rest.iter_mut().map(|s| scope.spawn(|| job(s))).collect();
            let mine = job(&mut first[0]);
            others
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .fold(mine, |a, b| a.and(b))
        })
        .map_err(ReadError::Io)?;
        Tensor::from_vec(data, shape, &Device::Cpu).map_err(ReadError::Candle)
    }

    /// Any other conversion (f64 and the integers): read, then candle's `to_dtype`.
    fn via_candle(
        &mut self,
        file: &File,
        info: &TensorInfo,
        target: DType,
    ) -> Result<Tensor, ReadError> {
        let mut buf = zeroed_vec::<u8>(info.len as usize);
        file.read_exact_at(&mut buf, info.offset)
            .map_err(ReadError::Io)?;
        Tensor::from_raw_buffer(&buf, info.dtype, &info.shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(target))
            .map_err(ReadError::Candle)
    }
}

/// Runs `job` on every item of `items`, on up to `threads` threads (the
/// calling one included) taking items in turn; the first error is returned
/// once every thread has stopped. One item runs on the calling thread alone.
fn in_parallel<I, F>(threads: usize, items: I, job: F) -> std::io::Result<()>
where
    I: ExactSizeIterator + Send,
    I::Item: Send,
    F: Fn(I::Item) -> std::io::Result<()> + Sync,
{
    let workers = threads.min(items.len());
    let work = std::sync::Mutex::new(items);
    let run = || -> std::io::Result<()> {
        loop {
            let Some(item) = work.lock().unwrap_or_else(|e| e.into_inner()).next() else {
                return Ok(());
            };
            job(item)?;
        }
    };
    if workers <= 1 {
        return run();
    }
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..workers).map(|_| scope.spawn(run)).collect();
        let mine = run();
        others
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .fold(mine, |a, b| a.and(b))
    })
}

/// Element types whose every bit pattern (all zeros included) is a value and
/// that have no padding, so their buffers can be filled as bytes.
///
/// # Safety
/// Only for such types.
unsafe trait Plain: candle_core::WithDType + Copy + Send + Sync {}
unsafe impl Plain for f32 {}
unsafe impl Plain for f64 {}
unsafe impl Plain for bf16 {}
unsafe impl Plain for f16 {}
unsafe impl Plain for i64 {}
unsafe impl Plain for i32 {}
unsafe impl Plain for i16 {}
unsafe impl Plain for u32 {}
unsafe impl Plain for u8 {}

fn as_bytes_mut<T: Plain>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: `T` has no padding and any bytes written make valid values (`Plain`).
    unsafe {
        std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), std::mem::size_of_val(values))
    }
}

/// The scratch words viewed as `T`s (at most 8 bytes each, so they are aligned).
fn as_plain_mut<T: Plain>(words: &mut [u64]) -> &mut [T] {
    const { assert!(std::mem::align_of::<T>() <= 8) };
    let n = std::mem::size_of_val(words) / std::mem::size_of::<T>();
    // SAFETY: u64 alignment satisfies `T`'s; every bit pattern is a valid `T` (`Plain`).
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), n) }
}

/// Faults in the whole pages of `bytes` in one call (MADV_POPULATE_WRITE)
/// instead of one page fault per 4 KiB page as the read or the conversion
/// writes them. Only a hint: kernels before 5.14 refuse it, and then the
/// pages are faulted in as they are written.
fn populate(bytes: &mut [u8]) {
    const PAGE: usize = 4096;
    let start = (bytes.as_mut_ptr() as usize).next_multiple_of(PAGE);
    let end = (bytes.as_mut_ptr() as usize + bytes.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies within `bytes`, which we may write; populating
        // pages for writing leaves their contents as they are.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
}

/// `n` zeros of `T`, allocated zeroed (fresh pages from the system for large
/// buffers: no pass over the memory before the read fills it).
fn zeroed_vec<T: Plain>(n: usize) -> Vec<T> {
    if n == 0 {
        return Vec::new();
    }
    let layout = std::alloc::Layout::array::<T>(n).expect("a tensor smaller than its file");
    // SAFETY: a non-zero size; all-zero bytes are a valid `T` (`Plain`); the
    // Vec owns the allocation with the layout it frees it with (n × T, T's alignment).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<T>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(ptr, n, n)
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

/// The weights `<stem>` of `dir` (see [`safetensors_files`]) loaded on
/// `device`, floats converted to `dtype`, as a VarBuilder.
///
/// A tensor stored in the dtype it is loaded in is the file's own pages,
/// mapped (see [`crate::mapped`]): on the CPU that is the tensor, so loading
/// it costs what reading the file costs and it is resident once, in the page
/// cache; for a GPU it is copied to the device from those pages, which are
/// then dropped. Every other tensor (converted, or where the file cannot be
/// mapped) is read one tensor at a time with positioned reads straight into
/// the buffer it keeps (several threads for a large one), floats converted
/// chunk by chunk as they are read, bit for bit as candle's `to_dtype`
/// converts them, then moved to the device.
/// Not candle's mmap-backed VarBuilder: it copies every tensor out of the
/// mapping and keeps the mapped pages resident meanwhile, so a CPU load would
/// peak at twice the weights. The file is read in order, the kernel asked to
/// read ahead of it. Here the peak is the weights plus, when converting, one
/// 8 MiB scratch buffer per reading thread (on a GPU: plus one tensor in host
/// memory or mapped, copied to the device as it is read).
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
/// the model is built from under that name; tensors come in the order of their
/// bytes in the file. It runs before the next tensor is read, so the load's peak stays the weights plus one tensor (and whatever the
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
    let mut reader = Reader::new();
    for path in safetensors_files(dir, stem)? {
        read_safetensors(&path, dtype, device, transform, &mut reader, &mut tensors)?;
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
    reader: &mut Reader,
    out: &mut HashMap<String, Tensor>,
) -> Result<(), E> {
    let mut file = SafetensorsFile::open(path)?;
    file.map();
    // In file order, the kernel told to read ahead of the tensor being read:
    // one sequential pass over the file however the reading threads interleave.
    let mut order: Vec<_> = file.header.tensors.iter().collect();
    order.sort_by_key(|(_, info)| info.offset);
    let mut ahead = 0;
    for (name, info) in order {
        read_ahead(
            &file.file,
            &mut ahead,
            info.offset + info.len + READ_AHEAD_BYTES,
        );
        let tensor = file
            .load(info, dtype, reader)?
            .to_device(device)
            .map_err(|source| LoadError::Safetensors {
                path: path.to_owned(),
                source,
            })?;
        out.insert(name.clone(), transform(name, tensor)?);
    }
    Ok(())
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
    fn a_cpu_load_in_the_stored_dtype_keeps_the_files_pages_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_weights(dir.path());
        let is_mapped = || {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            maps.lines().any(|l| l.ends_with(path.to_str().unwrap()))
        };
        let converted = var_builder(dir.path(), "model", DType::F16, &Device::Cpu).unwrap();
        assert!(!is_mapped(), "a converted load keeps no mapping");
        let vb = var_builder(dir.path(), "model", DType::F32, &Device::Cpu).unwrap();
        let w = vb.get((2, 3), "w").unwrap();
        drop((vb, converted));
        assert!(is_mapped(), "the tensor is the file's pages");
        assert_eq!(w.sum_all().unwrap().to_scalar::<f32>().unwrap(), 15.0);
        drop(w);
        assert!(!is_mapped(), "dropping the last tensor unmaps the file");
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

    /// `n` pseudo-random 64-bit words (xorshift; the same every run).
    fn random_words(n: usize, seed: u64) -> Vec<u64> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect()
    }

    /// A tensor of `dtype` whose bytes are `n` elements of random bits after
    /// the values conversions treat specially (zeros, infinities, NaNs with
    /// payloads, subnormals, the largest values, halfway cases of rounding).
    fn random_tensor(dtype: DType, shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let size = dtype.size_in_bytes();
        let mut bytes: Vec<u8> = random_words((n * size).div_ceil(8), seed)
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(n * size)
            .collect();
        let special: &[u32] = match dtype {
            DType::F32 => &[
                0,
                0x8000_0000,
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_0001,
                0x7f80_0001,
                0xffc1_2345,
                0x0000_0001,
                0x807f_ffff,
                0x7f7f_ffff,
                0x3f80_8000,
                0x3f81_8000,
                0x3f80_7fff,
                0x477f_f000,
                0x477f_efff,
                0x3380_0000,
                0x3300_0001,
                0x387f_e000,
            ],
            DType::F64 => &[],
            _ => &[
                0, 0x8000, 0x7c00, 0xfc00, 0x7e01, 0x7c01, 0x7f80, 0xff80, 0x7fc1, 0x7f81, 0x0001,
                0x83ff, 0x7bff, 0x7f7f, 0x3c00,
            ],
        };
        for (i, v) in special.iter().enumerate().take(n) {
            bytes[i * size..(i + 1) * size].copy_from_slice(&v.to_le_bytes()[..size]);
        }
        Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu).unwrap()
    }

    /// The tensor's bytes as stored in memory (so NaNs compare by their bits).
    fn bits(t: &Tensor) -> Vec<u8> {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::BF16 => t
                .to_vec1::<bf16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F16 => t
                .to_vec1::<f16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I64 => t
                .to_vec1::<i64>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F64 => t
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            other => panic!("no bits for {other:?}"),
        }
    }

    /// A checkpoint with f32, bf16 and f16 tensors of random bits (one of each
    /// large enough to span several 8 MiB chunks of the default reader), an
    /// f64, an integer and an empty tensor.
    fn write_mixed(dir: &Path) -> PathBuf {
        let mut tensors = HashMap::new();
        for (i, dtype) in [DType::F32, DType::BF16, DType::F16]
            .into_iter()
            .enumerate()
        {
            let seed = 17 + i as u64;
            let name = format!("{dtype:?}").to_lowercase();
            // 2,500,007 elements: 3 chunks of bf16/f16, 2 of f32, an odd tail.
            tensors.insert(
                format!("{name}.big"),
                random_tensor(dtype, &[2_500_007], seed),
            );
            tensors.insert(
                format!("{name}.w"),
                random_tensor(dtype, &[37, 61], seed * 3),
            );
            tensors.insert(format!("{name}.b"), random_tensor(dtype, &[5], seed * 5));
            tensors.insert(format!("{name}.one"), random_tensor(dtype, &[], seed * 7));
        }
        tensors.insert("f64".into(), random_tensor(DType::F64, &[9, 3], 99));
        tensors.insert(
            "ids".into(),
            Tensor::new(&[3i64, -1, i64::MAX], &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "empty".into(),
            Tensor::zeros((0, 4), DType::BF16, &Device::Cpu).unwrap(),
        );
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    }

    /// What loading `name` into `dtype` gave before the loader read straight
    /// into the tensors: the bytes read on their own, a candle tensor made of
    /// them, floats converted with `to_dtype`.
    fn plain_read(path: &Path, name: &str, dtype: DType) -> Tensor {
        let header = read_header(path).unwrap();
        let info = &header.tensors[name];
        let bytes = std::fs::read(path).unwrap();
        let range = info.offset as usize..(info.offset + info.len) as usize;
        let t =
            Tensor::from_raw_buffer(&bytes[range], info.dtype, &info.shape, &Device::Cpu).unwrap();
        if t.dtype().is_float() && t.dtype() != dtype {
            t.to_dtype(dtype).unwrap()
        } else {
            t
        }
    }

    /// Every tensor `var_builder_with` hands its transform, by name.
    fn loaded(dir: &Path, dtype: DType) -> BTreeMap<String, Tensor> {
        let mut seen = BTreeMap::new();
        var_builder_with(
            dir,
            "model",
            dtype,
            &Device::Cpu,
            &mut |name: &str, t: Tensor| {
                seen.insert(name.to_owned(), t.clone());
                Ok::<_, LoadError>(t)
            },
        )
        .unwrap();
        seen
    }

    #[test]
    fn loaded_tensors_are_bit_identical_to_a_plain_read_and_candle_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_mixed(dir.path());
        let file = SafetensorsFile::open(&path).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let got = loaded(dir.path(), dtype);
            assert_eq!(got.len(), file.header.tensors.len());
            // and through readers with small chunks and several threads, whose chunk
            // boundaries fall inside every tensor but the smallest (the tiniest chunks
            // only for the small tensors: one read each)
            let mut small = [
                Reader::with(3, 1 << 20),
                Reader::with(3, 8),
                Reader::with(2, 1024),
                Reader::with(1, 40),
            ];
            for (name, info) in &file.header.tensors {
                let want = plain_read(&path, name, dtype);
                let what = format!("{name} ({:?}) loaded as {dtype:?}", info.dtype);
                assert_eq!(got[name].dtype(), want.dtype(), "{what}");
                assert_eq!(got[name].dims(), want.dims(), "{what}");
                assert!(bits(&got[name]) == bits(&want), "{what}: bits differ");
                for reader in &mut small {
                    if info.len > 64 << 10 && reader.chunk_bytes < 1 << 20 {
                        continue;
                    }
                    let t = file.load(info, dtype, reader).unwrap();
                    assert!(
                        bits(&t) == bits(&want),
                        "{what}, chunks of {}: bits differ",
                        reader.chunk_bytes
                    );
                }
            }
            // the stored dtype, one tensor at a time (how LoRA files are read)
            for name in file.header.tensors.keys() {
                let want = plain_read(&path, name, file.header.tensors[name].dtype);
                assert!(bits(&file.tensor(name).unwrap()) == bits(&want), "{name}");
            }
        }
    }

    #[test]
    fn a_lora_merged_while_loading_matches_one_merged_into_a_plain_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_mixed(dir.path());
        // A rank-4 LoRA for every 2-D weight: W + scale * up @ down, in the load dtype.
        let lora = |name: &str, t: &Tensor| -> candle_core::Result<Tensor> {
            if t.rank() != 2 {
                return Ok(t.clone());
            }
            let (out, inn) = t.dims2()?;
            let seed = name.len() as u64;
            let up = random_tensor(DType::F32, &[out, 4], seed).clamp(-1f32, 1f32)?;
            let down = random_tensor(DType::F32, &[4, inn], seed + 1).clamp(-1f32, 1f32)?;
            let delta = (up.matmul(&down)? * 0.5)?.to_dtype(t.dtype())?;
            t + delta
        };
        for dtype in [DType::F32, DType::BF16] {
            let mut names = Vec::new();
            let vb = var_builder_with(
                dir.path(),
                "model",
                dtype,
                &Device::Cpu,
                &mut |name: &str, t: Tensor| {
                    names.push(name.to_owned());
                    lora(name, &t).map_err(|source| LoadError::Safetensors {
                        path: name.into(),
                        source,
                    })
                },
            )
            .unwrap();
            assert!(names.iter().any(|n| n == "bf16.w"), "{names:?}");
            for name in ["f32.w", "bf16.w", "f16.w", "f32.big", "f16.b"] {
                let want = lora(name, &plain_read(&path, name, dtype)).unwrap();
                let got = vb.get_unchecked_dtype(name, dtype).unwrap();
                assert!(
                    bits(&got) == bits(&want),
                    "{name} as {dtype:?}: bits differ"
                );
            }
        }
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
