//! Fuzz target: a TravelJob (JSON or YAML) through validation, planning and what the operator derives.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubewan_crds::fuzzing::traveljob_spec(data));
