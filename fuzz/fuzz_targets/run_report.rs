//! Fuzz target: a runner pod's termination message, read back as its report.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubewan_crds::fuzzing::run_report(data));
