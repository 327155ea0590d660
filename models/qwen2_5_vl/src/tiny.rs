//! Random-weight Qwen2.5-VL checkpoints in the released on-disk layout (flat
//! `config.json`, sharded `model-0000x-of-0000y.safetensors` with
//! `model.safetensors.index.json`, released key names, `tokenizer.json`,
//! `preprocessor_config.json`, `chat_template.json`, `generation_config.json`).
//!
//! [`write_tiny_checkpoint`] writes the few-hundred-KB model `kubewan-runner
//! tiny-ckpts` installs; [`CheckpointSpec::qwen25_vl_3b`] and
//! [`CheckpointSpec::qwen25_vl_7b`] give the real 3B and 7B dimensions for the
//! memory-release check and the GPU benchmark. The tokenizer and chat template are
//! the committed tiny ones (a byte-level BPE with the real Qwen special tokens).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::Error;
use crate::config::{TextConfig, VisionConfig};

const TOKENIZER_JSON: &[u8] =
    include_bytes!("../tests/data/tiny-released-untied-gqa/tokenizer.json");
const TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../tests/data/tiny-released-untied-gqa/tokenizer_config.json");
const CHAT_TEMPLATE_JSON: &[u8] =
    include_bytes!("../tests/data/tiny-released-untied-gqa/chat_template.json");

/// What to write.
#[derive(Debug, Clone)]
pub struct CheckpointSpec {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
    pub seed: u64,
    /// Approximate bytes per safetensors shard.
    pub shard_bytes: u64,
    pub min_pixels: usize,
    pub max_pixels: usize,
}

impl CheckpointSpec {
    /// A tiny model (hidden 32, 2 layers, GQA 4/2, 2 vision blocks with windows), f32.
    pub fn tiny(seed: u64) -> Self {
        Self {
            text: TextConfig {
                vocab_size: 422,
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: vec![2, 1, 1],
                hidden_act: "silu".into(),
            },
            vision: VisionConfig {
                depth: 2,
                hidden_size: 32,
                intermediate_size: 48,
                num_heads: 2,
                in_channels: 3,
                patch_size: 14,
                spatial_merge_size: 2,
                temporal_patch_size: 2,
                window_size: 56,
                out_hidden_size: 32,
                fullatt_block_indexes: vec![1],
                rope_theta: 10_000.0,
                hidden_act: "silu".into(),
            },
            tie_word_embeddings: false,
            dtype: DType::F32,
            seed,
            shard_bytes: 200_000,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 64,
        }
    }

    /// The real Qwen2.5-VL-3B-Instruct dimensions (vocab 151936, tied head), bf16.
    pub fn qwen25_vl_3b(seed: u64) -> Self {
        Self {
            text: TextConfig {
                vocab_size: 151_936,
                hidden_size: 2048,
                intermediate_size: 11_008,
                num_hidden_layers: 36,
                num_attention_heads: 16,
                num_key_value_heads: 2,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: vec![16, 24, 24],
                hidden_act: "silu".into(),
            },
            vision: VisionConfig {
                depth: 32,
                hidden_size: 1280,
                intermediate_size: 3420,
                num_heads: 16,
                in_channels: 3,
                patch_size: 14,
                spatial_merge_size: 2,
                temporal_patch_size: 2,
                window_size: 112,
                out_hidden_size: 2048,
                fullatt_block_indexes: vec![7, 15, 23, 31],
                rope_theta: 10_000.0,
                hidden_act: "silu".into(),
            },
            tie_word_embeddings: true,
            dtype: DType::BF16,
            seed,
            shard_bytes: 1 << 30,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
        }
    }

    /// The real Qwen2.5-VL-7B-Instruct dimensions (vocab 152064, untied head,
    /// GQA 28/4, vision merger to 3584), bf16: about 16.6 GB, the size of the
    /// released checkpoint (the GPU benchmark's load row).
    pub fn qwen25_vl_7b(seed: u64) -> Self {
        let mut spec = Self::qwen25_vl_3b(seed);
        spec.text = TextConfig {
            vocab_size: 152_064,
            hidden_size: 3584,
            intermediate_size: 18_944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            ..spec.text
        };
        spec.vision.out_hidden_size = 3584;
        spec.tie_word_embeddings = false;
        spec.shard_bytes = 4 << 30;
        spec
    }

    /// Every tensor of the checkpoint with its released key name and shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let t = &self.text;
        let v = &self.vision;
        let hd = t.head_dim();
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut push = |name: String, shape: &[usize]| out.push((name, shape.to_vec()));
        push(
            "model.embed_tokens.weight".into(),
            &[t.vocab_size, t.hidden_size],
        );
        for i in 0..t.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let (h, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
            push(format!("{p}.self_attn.q_proj.weight"), &[h, t.hidden_size]);
            push(format!("{p}.self_attn.q_proj.bias"), &[h]);
            push(format!("{p}.self_attn.k_proj.weight"), &[kv, t.hidden_size]);
            push(format!("{p}.self_attn.k_proj.bias"), &[kv]);
            push(format!("{p}.self_attn.v_proj.weight"), &[kv, t.hidden_size]);
            push(format!("{p}.self_attn.v_proj.bias"), &[kv]);
            push(format!("{p}.self_attn.o_proj.weight"), &[t.hidden_size, h]);
            push(
                format!("{p}.mlp.gate_proj.weight"),
                &[t.intermediate_size, t.hidden_size],
            );
            push(
                format!("{p}.mlp.up_proj.weight"),
                &[t.intermediate_size, t.hidden_size],
            );
            push(
                format!("{p}.mlp.down_proj.weight"),
                &[t.hidden_size, t.intermediate_size],
            );
            push(format!("{p}.input_layernorm.weight"), &[t.hidden_size]);
            push(
                format!("{p}.post_attention_layernorm.weight"),
                &[t.hidden_size],
            );
        }
        push("model.norm.weight".into(), &[t.hidden_size]);
        if !self.tie_word_embeddings {
            push("lm_head.weight".into(), &[t.vocab_size, t.hidden_size]);
        }
        let vh = v.hidden_size;
        push(
            "visual.patch_embed.proj.weight".into(),
            &[
                vh,
                v.in_channels,
                v.temporal_patch_size,
                v.patch_size,
                v.patch_size,
            ],
        );
        for i in 0..v.depth {
            let p = format!("visual.blocks.{i}");
            push(format!("{p}.norm1.weight"), &[vh]);
            push(format!("{p}.norm2.weight"), &[vh]);
            push(format!("{p}.attn.qkv.weight"), &[3 * vh, vh]);
            push(format!("{p}.attn.qkv.bias"), &[3 * vh]);
            push(format!("{p}.attn.proj.weight"), &[vh, vh]);
            push(format!("{p}.attn.proj.bias"), &[vh]);
            for (n, shape) in [
                ("gate_proj", [v.intermediate_size, vh]),
                ("up_proj", [v.intermediate_size, vh]),
                ("down_proj", [vh, v.intermediate_size]),
            ] {
                push(format!("{p}.mlp.{n}.weight"), &shape);
                push(format!("{p}.mlp.{n}.bias"), &shape[..1]);
            }
        }
        let merged = vh * v.spatial_merge_size * v.spatial_merge_size;
        push("visual.merger.ln_q.weight".into(), &[vh]);
        push("visual.merger.mlp.0.weight".into(), &[merged, merged]);
        push("visual.merger.mlp.0.bias".into(), &[merged]);
        push(
            "visual.merger.mlp.2.weight".into(),
            &[v.out_hidden_size, merged],
        );
        push("visual.merger.mlp.2.bias".into(), &[v.out_hidden_size]);
        out
    }

    fn config_json(&self, ids: &BTreeMap<&str, u32>) -> Value {
        let t = &self.text;
        let v = &self.vision;
        json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
            "vision_token_id": ids["<|vision_pad|>"],
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": 128000,
            "max_window_layers": t.num_hidden_layers,
            "model_type": "qwen2_5_vl",
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "sliding_window": 32768,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": match self.dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
            "transformers_version": "4.41.2",
            "use_cache": true,
            "use_sliding_window": false,
            "vision_config": {
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "spatial_patch_size": v.patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": v.fullatt_block_indexes,
                "tokens_per_second": 2,
                "temporal_patch_size": v.temporal_patch_size
            },
            "rope_scaling": {"type": "mrope", "mrope_section": t.mrope_section},
            "vocab_size": t.vocab_size
        })
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<(), Error> {
    write(
        path,
        serde_json::to_string_pretty(v)
            .unwrap_or_default()
            .as_bytes(),
    )
}

/// Random values for one tensor: norms around 1, biases small, matrices with
/// variance 1/fan_in (uniform), embeddings with unit variance.
fn random_tensor(
    name: &str,
    shape: &[usize],
    dtype: DType,
    rng: &mut impl Rng,
) -> Result<Tensor, Error> {
    let n: usize = shape.iter().product();
    let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
    let (center, half) = if shape.len() == 1 && (name.contains("norm") || name.contains("ln_q")) {
        (1.0f32, 0.3f32)
    } else if shape.len() == 1 {
        (0.0, 0.3)
    } else if name.contains("embed_tokens") {
        (0.0, 3f32.sqrt())
    } else {
        (0.0, (3.0 / fan_in as f32).sqrt())
    };
    let data: Vec<f32> = (0..n)
        .map(|_| center + half * (2.0 * rng.random::<f32>() - 1.0))
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Writes a random-weight checkpoint for `spec` into `dir` (created if needed).
pub fn write_checkpoint(dir: &Path, spec: &CheckpointSpec) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    let tok = tokenizers::Tokenizer::from_bytes(TOKENIZER_JSON).map_err(|e| Error::Tokenizer {
        path: dir.join("tokenizer.json"),
        msg: e.to_string(),
    })?;
    let mut ids = BTreeMap::new();
    for name in [
        "<|endoftext|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ] {
        let id = tok
            .token_to_id(name)
            .ok_or_else(|| Error::Invalid(format!("the tiny tokenizer lacks {name}")))?;
        if id as usize >= spec.text.vocab_size {
            return Err(Error::Invalid(format!(
                "{name} id {id} is outside the vocab"
            )));
        }
        ids.insert(name, id);
    }
    write(&dir.join("tokenizer.json"), TOKENIZER_JSON)?;
    write(&dir.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    write(&dir.join("chat_template.json"), CHAT_TEMPLATE_JSON)?;
    write_json(&dir.join("config.json"), &spec.config_json(&ids))?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "transformers_version": "4.49.0"
        }),
    )?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "min_pixels": spec.min_pixels,
            "max_pixels": spec.max_pixels,
            "patch_size": spec.vision.patch_size,
            "temporal_patch_size": spec.vision.temporal_patch_size,
            "merge_size": spec.vision.spatial_merge_size,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"
        }),
    )?;

    // shard plan: consecutive tensors until a shard holds shard_bytes
    let tensors = spec.tensors();
    let elem = spec.dtype.size_in_bytes() as u64;
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut in_shard = 0u64;
    for (i, (_, shape)) in tensors.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() as u64 * elem;
        if in_shard > 0 && in_shard + bytes > spec.shard_bytes {
            shards.push(vec![]);
            in_shard = 0;
        }
        shards.last_mut().unwrap().push(i);
        in_shard += bytes;
    }
    let written = write_shards(dir, spec, &tensors, &shards)?;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (name, file, bytes) in written {
        weight_map.insert(name, Value::String(file));
        total += bytes;
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )
}

/// Writes every shard (the tensors at each member list) in parallel: they are
/// independent, each with its own seeded generator, so a 16.6 GB 7B checkpoint
/// takes a fraction of the sequential time. Returns the index entries.
fn write_shards(
    dir: &Path,
    spec: &CheckpointSpec,
    tensors: &[(String, Vec<usize>)],
    shards: &[Vec<usize>],
) -> Result<Vec<(String, String, u64)>, Error> {
    let count = shards.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(count);
    let work = || -> Result<Vec<(String, String, u64)>, Error> {
        let mut done = Vec::new();
        loop {
            let s = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if s >= count {
                return Ok(done);
            }
            done.extend(write_shard(dir, spec, tensors, &shards[s], s, count)?);
        }
    };
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut entries = Vec::new();
    for result in results {
        entries.extend(result.map_err(|_| Error::Invalid("a shard writer panicked".into()))??);
    }
    Ok(entries)
}

/// Writes shard `s` of `count` (the tensors at `members`) with its own seeded
/// generator; returns (tensor name, file name, bytes) for the index.
fn write_shard(
    dir: &Path,
    spec: &CheckpointSpec,
    tensors: &[(String, Vec<usize>)],
    members: &[usize],
    s: usize,
    count: usize,
) -> Result<Vec<(String, String, u64)>, Error> {
    let file = format!("model-{:05}-of-{count:05}.safetensors", s + 1);
    let seed = spec.seed ^ (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut map = std::collections::HashMap::new();
    let mut entries = Vec::with_capacity(members.len());
    for &i in members {
        let (name, shape) = &tensors[i];
        let t = random_tensor(name, shape, spec.dtype, &mut rng)?;
        entries.push((
            name.clone(),
            file.clone(),
            (t.elem_count() * spec.dtype.size_in_bytes()) as u64,
        ));
        map.insert(name.clone(), t);
    }
    let path = dir.join(&file);
    candle_core::safetensors::save(&map, &path)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    Ok(entries)
}

/// Writes the tiny random-weight Qwen2.5-VL folder `kubewan-runner tiny-ckpts` installs.
pub fn write_tiny_checkpoint(dir: &Path, seed: u64) -> Result<(), Error> {
    write_checkpoint(dir, &CheckpointSpec::tiny(seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GenerateRequest, Qwen25Vl, Sampling};

    #[test]
    fn the_7b_spec_has_the_released_parameter_count() {
        let spec = CheckpointSpec::qwen25_vl_7b(0);
        let params: usize = spec
            .tensors()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        // Qwen2.5-VL-7B-Instruct: 8 292 166 656 parameters (16.6 GB in bf16).
        assert_eq!(params, 8_292_166_656);
    }

    #[test]
    fn tiny_checkpoint_loads_and_generates() {
        let dir = std::env::temp_dir().join(format!("kubewan-qwen-tiny-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_tiny_checkpoint(&dir, 5).unwrap();
        crate::checkpoint::require(&dir).unwrap();
        assert!(
            dir.join("model-00002-of-00003.safetensors").is_file()
                || dir.join("model-00002-of-00002.safetensors").is_file()
        );
        let mut m = Qwen25Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(200, 120, |x, y| {
            image::Rgb([(x % 256) as u8, (y * 2 % 256) as u8, ((x + y) % 256) as u8])
        }));
        let req = GenerateRequest {
            system: Some("You are a video direction assistant.".into()),
            images: vec![img.clone(), img],
            prompt: "Describe the motion.".into(),
            max_new_tokens: 6,
            sampling: Sampling::Sample {
                temperature: 0.8,
                top_p: 0.9,
                seed: 3,
            },
        };
        let a = m.generate(&req).unwrap();
        let b = m.generate(&req).unwrap();
        assert_eq!(a, b, "same seed, same output");
        let mut streamed = Vec::new();
        let c = m.generate_streaming(&req, |t| streamed.push(t)).unwrap();
        assert_eq!(c, a, "streaming changes nothing in the output");
        assert_eq!(streamed, a.token_ids, "each token streamed once, in order");
        assert!(!a.token_ids.is_empty() && a.token_ids.len() <= 6);
        assert_eq!(a.top_logits.len(), 5);
        assert!(a.top_logits.iter().all(|(_, l)| l.is_finite()));
        // the same seed writes the same weights
        let dir2 = dir.with_extension("again");
        write_tiny_checkpoint(&dir2, 5).unwrap();
        let mut m2 = Qwen25Vl::load(&dir2, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m2.generate(&req).unwrap(), a);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }
}
