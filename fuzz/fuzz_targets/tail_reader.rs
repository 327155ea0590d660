//! Fuzz target: a chained segment's tail frames file from a shared volume.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubewan_runner::fuzzing::tail_reader(data));
