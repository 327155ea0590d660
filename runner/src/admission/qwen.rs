//! What the prompt-writing Qwen2.5-VL needs per phase: `vlm_load` (its
//! weights and the loader's staging) and `vlm_generate` (its weights and the
//! activations of one prompt, the largest keyframe pair counting).
//!
//! Notation: `s` bytes per element of the compute dtype; `S(b, q, k)` the
//! score block the shared attention holds at once ([`attention_score_elems`]:
//! the tiled path's scratch on the CPU, one chunk of queries elsewhere), whose
//! bytes are `S·(2s + 8)` (the product in `s`, the f32 scores, the f32
//! softmax; an upper bound for the CPU's f32 tiles).
//!
//! **Vision tower** — the pair is one canvas of `w1 + w2` × `max(h1, h2)`
//! pixels, resized as the processor resizes it (`smart_resize` to multiples of
//! `patch × merge` within `min_pixels..max_pixels`), so it has
//! `P = (H'/patch)·(W'/patch)` patches (one temporal patch: an image is its
//! frame repeated). The patches arrive as `P·3·t·patch²` f32. A block holds
//! the residual, the norm, q/k/v, the f32 RoPE copies of q and k and their
//! rotated results and the attention output, `P·D_v·(8s + 12)`, the SwiGLU
//! MLP `3·P·I_v·s`, and in the full-attention blocks the scores of the whole
//! image `S(heads_v, P, P)`.
//!
//! **Text prefill** — `T` tokens: the canvas's `P / merge²` image tokens plus
//! the text, bounded by its bytes (a byte-level BPE never makes more tokens
//! than bytes) and the chat template's markup. A decoder layer holds
//! `T·D·(8s + 12)` like a vision block, its MLP `3·T·I·s`, the causal scores
//! `S(heads, T, T)` and the f32 causal mask `T²·4`. Alongside: the prompt
//! embeddings `T·D·s`, the KV cache for the prompt and every new token
//! `layers·2·(T + max_new_tokens)·kv_heads·head_dim·s`, and the last
//! position's logits `vocab·(s + 4)`. The vision tower's activations are gone
//! before the prefill starts, so the larger of the two counts.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use kubewan_model_common::nn::attention_score_elems;
use kubewan_qwen2_5_vl::checkpoint;
use kubewan_qwen2_5_vl::config::Config;
use kubewan_qwen2_5_vl::processor::{PreprocessorConfig, smart_resize};

use super::{Activations, PhaseNeed, weights};
use crate::probe::phases;

/// Tokens of Qwen's chat markup around a prompt (role headers, image
/// delimiters, end markers: about 20), with room to spare.
const CHAT_MARKUP_TOKENS: u64 = 64;

/// One prompt's inputs, the largest of the job's pairs.
#[derive(Clone, Copy, Debug)]
pub struct VlmShapes {
    /// The side-by-side canvas, width × height.
    pub canvas: (u32, u32),
    /// Bytes of the system prompt and the instruction.
    pub text_bytes: usize,
    pub max_new_tokens: usize,
    pub dtype: DType,
}

/// The needs of `vlm_load` and `vlm_generate` of the checked model folder `dir`.
pub fn needs(dir: &Path, shapes: &VlmShapes, device: &Device) -> Result<[PhaseNeed; 2]> {
    let config = Config::from_dir(dir)?;
    let pre = PreprocessorConfig::from_file(&checkpoint::PREPROCESSOR.path(dir))?;
    let weights = vec![weights(dir, &checkpoint::WEIGHTS, shapes.dtype)?];
    let activations = generate_activations(&config, &pre, shapes, device)
        .with_context(|| format!("sizing the VLM {}", dir.display()))?;
    Ok([
        PhaseNeed {
            phase: phases::VLM_LOAD,
            weights: weights.clone(),
            loads: true,
            activations: Activations::default(),
        },
        PhaseNeed {
            phase: phases::VLM_GENERATE,
            weights,
            loads: false,
            activations,
        },
    ])
}

/// The activations of one `generate` call (see the module docs).
pub fn generate_activations(
    config: &Config,
    pre: &PreprocessorConfig,
    shapes: &VlmShapes,
    device: &Device,
) -> Result<Activations> {
    let s = shapes.dtype.size_in_bytes() as u64;
    // Neither tower has an additive mask (the text's is causal).
    let scores = |b: usize, q: u64, k: u64, head_dim: usize| {
        attention_score_elems(device, b, q as usize, k as usize, head_dim, false) as u64
            * (2 * s + 8)
    };
    let (w, h) = shapes.canvas;
    let (rh, rw) = smart_resize(
        h as usize,
        w as usize,
        pre.patch_size * pre.merge_size,
        pre.min_pixels,
        pre.max_pixels,
    )?;
    let patches = ((rh / pre.patch_size) * (rw / pre.patch_size)) as u64;
    let v = &config.vision;
    let (dv, iv) = (v.hidden_size as u64, v.intermediate_size as u64);
    let patch_values = (3 * pre.temporal_patch_size * pre.patch_size * pre.patch_size) as u64;
    let vision = patches * patch_values * 4
        + patches * dv * (8 * s + 12)
        + 3 * patches * iv * s
        + scores(v.num_heads, patches, patches, v.head_dim());

    let t = &config.text;
    let merge = (pre.merge_size * pre.merge_size) as u64;
    let tokens = patches / merge + shapes.text_bytes as u64 + CHAT_MARKUP_TOKENS;
    let (d, i) = (t.hidden_size as u64, t.intermediate_size as u64);
    let prefill = tokens * d * (8 * s + 12)
        + 3 * tokens * i * s
        + scores(t.num_attention_heads, tokens, tokens, t.head_dim())
        + tokens * tokens * 4;
    let kv_cache = t.num_hidden_layers as u64
        * 2
        * (tokens + shapes.max_new_tokens as u64)
        * t.num_key_value_heads as u64
        * t.head_dim() as u64
        * s;
    let logits = t.vocab_size as u64 * (s + 4);
    Ok(Activations {
        device_bytes: vision.max(prefill) + tokens * d * s + kv_cache + logits,
        host_bytes: patches * patch_values * 4,
        shapes: format!(
            "{patches} image patches of a {w}x{h} pair, up to {tokens} prompt tokens + {} new",
            shapes.max_new_tokens
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tiled_scratch_by_hand;
    use super::*;

    fn shapes(canvas: (u32, u32)) -> VlmShapes {
        VlmShapes {
            canvas,
            text_bytes: 900,
            max_new_tokens: 512,
            dtype: DType::BF16,
        }
    }

    fn qwen_7b() -> (Config, PreprocessorConfig) {
        let config: serde_json::Value = serde_json::json!({
            "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "image_token_id": 151655, "video_token_id": 151656,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "eos_token_id": 151645,
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
                "fullatt_block_indexes": [7, 15, 23, 31]}
        });
        let path = Path::new("config.json");
        let pre = serde_json::json!({"min_pixels": 3136, "max_pixels": 1003520});
        (
            Config::from_value(path, &config).unwrap(),
            PreprocessorConfig::from_value(path, &pre).unwrap(),
        )
    }

    #[test]
    fn generate_activations_on_two_shapes() {
        let (config, pre) = qwen_7b();
        let cpu = Device::Cpu;
        // Two 832x480 keyframes: 1664x480 → smart_resize 1652x476 → 34 × 118 patches.
        let a = generate_activations(&config, &pre, &shapes((1664, 480)), &cpu).unwrap();
        let p: u64 = 34 * 118;
        // On the CPU attention holds no score matrix, only the tiled path's
        // scratch (head dims 80 and 128).
        let vision = p * 1176 * 4
            + p * 1280 * (8 * 2 + 12)
            + 3 * p * 3420 * 2
            + tiled_scratch_by_hand(80) * (2 * 2 + 8);
        let tokens = p / 4 + 900 + 64;
        assert_eq!(tokens, 1967);
        let prefill = tokens * 3584 * (8 * 2 + 12)
            + 3 * tokens * 18944 * 2
            + tiled_scratch_by_hand(128) * 12
            + tokens * tokens * 4;
        let kv = 28 * 2 * (tokens + 512) * 4 * 128 * 2;
        let expected = vision.max(prefill) + tokens * 3584 * 2 + kv + 152064 * 6;
        assert_eq!(a.device_bytes, expected);
        assert!(
            a.shapes
                .starts_with("4012 image patches of a 1664x480 pair"),
            "{}",
            a.shapes
        );
        // Pairs of 4K frames are capped by max_pixels (1003520 = 1280 merged tokens):
        // at most 5120 patches, so the need stops growing with the pictures.
        let huge = generate_activations(&config, &pre, &shapes((7680, 2160)), &cpu).unwrap();
        let huger = generate_activations(&config, &pre, &shapes((15360, 4320)), &cpu).unwrap();
        assert!(huge.device_bytes > a.device_bytes);
        assert_eq!(huge.device_bytes, huger.device_bytes);
    }
}
