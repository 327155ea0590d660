//! A tiny random-weight Wan2.1 FLF2V pipeline in the diffusers layout, for `kubewan-runner
//! tiny-ckpts`: every component folder with its real config and key names (those of the
//! committed parity pipeline `tests/data/tiny-flf2v/model`, built by `scripts/make_tiny.py` with
//! diffusers/transformers' `save_pretrained`), and weights drawn afresh here from a seeded
//! generator with the same shapes. The video it makes is noise; the plumbing is real.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

macro_rules! tiny_file {
    ($rel:literal) => {
        (
            $rel,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/tiny-flf2v/model/",
                $rel
            ))
            .as_slice(),
        )
    };
}

/// (relative path, bytes) of the committed tiny pipeline.
const FILES: &[(&str, &[u8])] = &[
    tiny_file!("model_index.json"),
    tiny_file!("transformer/config.json"),
    tiny_file!("transformer/diffusion_pytorch_model.safetensors"),
    tiny_file!("vae/config.json"),
    tiny_file!("vae/diffusion_pytorch_model.safetensors"),
    tiny_file!("text_encoder/config.json"),
    tiny_file!("text_encoder/model.safetensors"),
    tiny_file!("tokenizer/tokenizer.json"),
    tiny_file!("tokenizer/tokenizer_config.json"),
    tiny_file!("image_encoder/config.json"),
    tiny_file!("image_encoder/model.safetensors"),
    tiny_file!("image_processor/preprocessor_config.json"),
    tiny_file!("scheduler/scheduler_config.json"),
];

fn normal(rng: &mut rand::rngs::StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Fresh values for one weight, scaled as make_tiny.py scales them (norms around 1, biases
/// small, matrices N(0, 1/fan_in)), so activations stay in range.
fn fresh(name: &str, shape: &[usize], rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
    let is_norm = name.contains("norm") || name.contains("gamma") || name.contains("layrnorm");
    let (mean, std) =
        if shape.len() == 1 && is_norm && name.ends_with("weight") || name.ends_with("gamma") {
            (1.0, 0.2)
        } else if shape.len() <= 1 {
            (0.0, 0.05)
        } else if name.contains("scale_shift_table") || name.contains("pos_embed") {
            (0.0, 0.3)
        } else if name.contains("relative_attention_bias") {
            (0.0, 1.0)
        } else {
            (0.0, (fan_in as f32).powf(-0.5))
        };
    (0..n).map(|_| mean + std * normal(rng)).collect()
}

/// Writes the tiny pipeline into `dir` (created if needed); weights from `seed`.
pub fn write_tiny_checkpoint(dir: &Path, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (rel, bytes) in FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::msg(format!("cannot create {}: {e}", parent.display())))?;
        }
        if rel.ends_with(".safetensors") {
            let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            let mut out = HashMap::new();
            for name in names {
                let t = &tensors[name];
                let values = fresh(name, t.dims(), &mut rng);
                let fresh = Tensor::from_vec(values, t.dims(), &Device::Cpu)?;
                let fresh = if t.dtype() == DType::F32 {
                    fresh
                } else {
                    fresh.to_dtype(t.dtype())?
                };
                out.insert(name.clone(), fresh);
            }
            candle_core::safetensors::save(&out, &path)
                .map_err(|e| Error::msg(format!("cannot write {}: {e}", path.display())))?;
        } else {
            std::fs::write(&path, bytes)
                .map_err(|e| Error::msg(format!("cannot write {}: {e}", path.display())))?;
        }
    }
    Ok(())
}
