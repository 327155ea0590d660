//! What the fuzz targets (`fuzz/fuzz_targets/`) feed the safetensors parser,
//! so that the fuzzer and the stable replay of its kept corpus
//! (`runner/tests/fuzz_corpus.rs`) run the same code, and the in-memory file
//! that fuzz targets of file readers hand their input in. An entry point takes
//! arbitrary bytes and must return (an error is fine) without panicking,
//! overflowing or allocating more than its input justifies.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::Path;

use candle_core::DType;

use crate::safetensors::SafetensorsFile;

/// `data` as an open file that lives in memory only (a memfd), for readers
/// that take a file; None when the kernel refuses one.
pub fn in_memory_file(data: &[u8]) -> Option<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd (or -1).
    let fd = unsafe { libc::memfd_create(c"fuzz-input".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    Some(file)
}

/// A safetensors file (a checkpoint shard, a LoRA, a chained segment's tail):
/// its header parsed and validated, then every tensor it describes read, as
/// the loaders do. Whatever the header claims, what is read stays within the
/// file: the parser must refuse a header whose tensors do not tile the data.
pub fn safetensors_header(data: &[u8]) {
    let Some(file) = in_memory_file(data) else {
        return;
    };
    let Ok(file) = SafetensorsFile::from_file(file, Path::new("fuzz input")) else {
        return;
    };
    let header = &file.header;
    let described: u64 = header.tensors.values().map(|t| t.len).sum();
    assert_eq!(described, header.data_bytes, "the tensors tile the data");
    assert!(
        header.data_bytes <= data.len() as u64,
        "the data fits the file"
    );
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        header.loaded_bytes(dtype);
    }
    for (name, info) in &header.tensors {
        assert!(
            info.offset + info.len <= data.len() as u64,
            "{name} ends past the file"
        );
        if let Ok(tensor) = file.tensor(name) {
            assert_eq!(tensor.dims(), info.shape, "{name} has the header's shape");
        }
    }
}
