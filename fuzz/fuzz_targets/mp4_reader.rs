//! Fuzz target: a segment MP4 from a shared volume (demuxer and decoder).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubewan_runner::fuzzing::mp4_reader(data));
