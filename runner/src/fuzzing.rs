//! What the fuzz targets (`fuzz/fuzz_targets/`) feed the runner's readers of
//! untrusted media, in one place, so that the fuzzer and the replay of its
//! kept corpus (`tests/fuzz_corpus.rs`, a normal stable test) run the same
//! code. Each entry point takes arbitrary bytes and must return (an error is
//! fine) without panicking, hanging or allocating without bound. [`TARGETS`]
//! also lists the targets whose entry points live in the crates they test
//! (`kubewan_crds::fuzzing`, `kubewan_model_common::fuzzing`), so one replay
//! covers them all.

use std::io::Cursor;
use std::path::Path;

use kubewan_model_common::fuzzing::{in_memory_file, safetensors_header};

use crate::video::Mp4Reader;
use crate::video::frames::{FramesShape, read_frames_from};

/// A segment MP4 from a shared volume: the demuxer's index, then every frame decoded.
pub fn mp4_reader(data: &[u8]) {
    let Ok(mut reader) = Mp4Reader::from_reader(Cursor::new(data), data.len() as u64, "fuzz input")
    else {
        return;
    };
    while let Ok(Some(_)) = reader.next_frame() {}
}

/// The frames a chained segment's tail file must hold in [`tail_reader`].
pub const TAIL_SHAPE: FramesShape = FramesShape {
    count: 2,
    width: 8,
    height: 8,
};

/// A chained segment's tail file from a shared volume (a safetensors file of
/// [`TAIL_SHAPE`] frames), read from an in-memory file.
pub fn tail_reader(data: &[u8]) {
    let Some(file) = in_memory_file(data) else {
        return;
    };
    let _ = read_frames_from(&file, Path::new("fuzz input"), TAIL_SHAPE);
}

/// A fuzz target: its name (the folder of its corpus under `fuzz/corpus/`)
/// and its entry point.
pub type FuzzTarget = (&'static str, fn(&[u8]));

/// Every fuzz target: the runner's own, and those of the crates it builds on
/// (their entry points live next to the code they test).
pub const TARGETS: &[FuzzTarget] = &[
    ("mp4_reader", mp4_reader),
    ("tail_reader", tail_reader),
    ("safetensors_header", safetensors_header),
    ("traveljob_spec", kubewan_crds::fuzzing::traveljob_spec),
    ("run_report", kubewan_crds::fuzzing::run_report),
];
