//! Fuzz target: a safetensors file (checkpoint shard, LoRA, tail frames): header and tensors.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubewan_model_common::fuzzing::safetensors_header(data));
