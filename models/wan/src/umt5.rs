//! UMT5 encoder (the text encoder of Wan2.1), loaded from a diffusers `text_encoder/` folder
//! (`config.json` + `model.safetensors` or shards) with transformers' key names.
//!
//! Unlike T5 (and candle's `t5.rs`), every UMT5 layer owns its relative attention bias
//! (`encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight`). The FFN is gated
//! (`wi_0` through the activation times `wi_1`, then `wo`), the norms are T5's RMS norm without a
//! bias, and attention scores are not scaled by 1/sqrt(d).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use kubewan_model_common::activation::{gelu_erf, gelu_tanh};
use kubewan_model_common::nn::{Linear, Mask, RmsNorm, attention_merged, linear_no_bias};
use serde::Deserialize;

use crate::{Error, Result, checkpoint};

/// The fields of `text_encoder/config.json` this encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub dense_act_fn: Option<String>,
    #[serde(default)]
    pub is_gated_act: Option<bool>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "gated-gelu".into()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    GeluTanh,
    GeluErf,
    Relu,
}

impl Umt5Config {
    /// (gated, activation) as transformers derives them from `feed_forward_proj`.
    fn ffn(&self) -> Result<(bool, Act)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let gated = self
            .is_gated_act
            .unwrap_or(parts.len() > 1 && parts[0] == "gated");
        let name = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new".to_string()
        } else {
            self.dense_act_fn
                .clone()
                .unwrap_or_else(|| parts[parts.len() - 1].to_string())
        };
        let act = match name.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "gelu" => Act::GeluErf,
            "relu" => Act::Relu,
            other => {
                return Err(Error::msg(format!(
                    "UMT5: unsupported activation {other:?}"
                )));
            }
        };
        Ok((gated, act))
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// [num_buckets, num_heads]
    relative_attention_bias: Tensor,
    heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn load(vb: VarBuilder, cfg: &Umt5Config) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            relative_attention_bias: vb.pp("relative_attention_bias").get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "weight",
            )?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `buckets`: u32 [s*s]; `mask`: additive f32 [b,1,1,s].
    fn forward(&self, x: &Tensor, buckets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // [s*s, heads] -> [1, heads, s, s]
        let bias = self
            .relative_attention_bias
            .index_select(buckets, 0)?
            .reshape((s, s, self.heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?;
        // The position bias and the padding mask are both added to the scores; T5 does not
        // scale them by 1/sqrt(d).
        let bias = match mask {
            Some(mask) => bias.broadcast_add(mask)?,
            None => bias,
        };
        let out = attention_merged(&q, &k, &v, Mask::Additive(&bias), 1.0)?;
        Ok(self.o.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    act: Act,
}

impl FeedForward {
    fn load(vb: VarBuilder, cfg: &Umt5Config) -> Result<Self> {
        let (gated, act) = cfg.ffn()?;
        let (wi_0, wi_1) = if gated {
            (
                linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                Some(linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?),
            )
        } else {
            (linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"))?, None)
        };
        Ok(Self {
            wi_0,
            wi_1,
            wo: linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.wi_0.forward(x)?;
        let h = match self.act {
            Act::GeluTanh => gelu_tanh(&h)?,
            Act::GeluErf => gelu_erf(&h)?,
            Act::Relu => h.relu()?,
        };
        let h = match &self.wi_1 {
            Some(wi_1) => (h * wi_1.forward(x)?)?,
            None => h,
        };
        Ok(self.wo.forward(&h)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

/// The UMT5 encoder stack: embeddings, `num_layers` blocks (each with its own relative position
/// bias), the final RMS norm.
#[derive(Debug, Clone)]
pub struct Umt5Encoder {
    embed_tokens: candle_nn::Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    config: Umt5Config,
    device: Device,
    dtype: DType,
}

impl Umt5Encoder {
    /// Loads the text encoder component folder `dir` (`config.json`, `model*.safetensors`) in
    /// `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config: Umt5Config = checkpoint::TEXT_ENCODER_CONFIG.read_json(dir, "a UMT5 config")?;
        let vb = checkpoint::TEXT_ENCODER_WEIGHTS.var_builder(dir, dtype, device)?;
        Self::from_var_builder(&config, vb).map_err(|e| match e {
            Error::Candle(source) => Error::model(dir, source),
            other => other,
        })
    }

    pub fn from_var_builder(config: &Umt5Config, vb: VarBuilder) -> Result<Self> {
        let emb_name = if vb.contains_tensor("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        let emb = vb.get((config.vocab_size, config.d_model), emb_name)?;
        let embed_tokens = candle_nn::Embedding::new(emb, config.d_model);
        let enc = vb.pp("encoder");
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let b = enc.pp(format!("block.{i}"));
            blocks.push(Block {
                attn_norm: RmsNorm::new(
                    config.d_model,
                    config.layer_norm_epsilon,
                    b.pp("layer.0.layer_norm"),
                )?,
                attn: SelfAttention::load(b.pp("layer.0.SelfAttention"), config)?,
                ff_norm: RmsNorm::new(
                    config.d_model,
                    config.layer_norm_epsilon,
                    b.pp("layer.1.layer_norm"),
                )?,
                ff: FeedForward::load(b.pp("layer.1.DenseReluDense"), config)?,
            });
        }
        let final_norm = RmsNorm::new(
            config.d_model,
            config.layer_norm_epsilon,
            enc.pp("final_layer_norm"),
        )?;
        Ok(Self {
            embed_tokens,
            blocks,
            final_norm,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Umt5Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `input_ids`: integer [b, s]; `attention_mask`: [b, s] with 1 for real tokens and 0 for
    /// padding (keys with 0 are masked out). Returns the last hidden state [b, s, d_model] for
    /// every position (padding rows included, as transformers computes them).
    pub fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let ids = input_ids.to_device(&self.device)?.to_dtype(DType::U32)?;
        let (b, s) = ids.dims2()?;
        let buckets = relative_buckets(
            s,
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
            &self.device,
        )?;
        let mask = match attention_mask {
            Some(m) => {
                let m = m.to_device(&self.device)?.to_dtype(DType::F32)?;
                if m.dims2()? != (b, s) {
                    return Err(Error::msg(format!(
                        "UMT5: attention mask shape {:?} does not match ids {:?}",
                        m.dims(),
                        (b, s)
                    )));
                }
                // (1 - mask) * most negative f32: masked keys get exactly zero weight.
                Some(
                    m.affine(-1.0, 1.0)?
                        .affine(f32::MIN as f64, 0.0)?
                        .reshape((b, 1, 1, s))?,
                )
            }
            None => None,
        };
        let mut x = self.embed_tokens.forward(&ids)?;
        for block in &self.blocks {
            let h = block
                .attn
                .forward(&block.attn_norm.forward(&x)?, &buckets, mask.as_ref())?;
            x = clamp_f16(&(x + h)?)?;
            let h = block.ff.forward(&block.ff_norm.forward(&x)?)?;
            x = clamp_f16(&(x + h)?)?;
        }
        Ok(self.final_norm.forward(&x)?)
    }
}

/// transformers' f16 guard after each UMT5 sub-layer: when an infinity appeared, clamp everything
/// to +-(f16::MAX - 1000). A no-op for other dtypes.
fn clamp_f16(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x.clone());
    }
    let has_inf = x
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        .is_infinite();
    if !has_inf {
        return Ok(x.clone());
    }
    let limit = 65504.0 - 1000.0;
    Ok(x.clamp(-limit, limit)?)
}

/// The bidirectional relative-position bucket of `key - query` (T5's `_relative_position_bucket`
/// for an encoder), as transformers computes it in f32.
pub fn relative_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { half } else { 0 };
    let n = relative_position.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as u32
}

/// Buckets for every (query, key) pair of a length-`s` sequence, u32 [s*s] (row = query).
fn relative_buckets(
    s: usize,
    num_buckets: usize,
    max_distance: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut v = Vec::with_capacity(s * s);
    for q in 0..s as i64 {
        for k in 0..s as i64 {
            v.push(relative_bucket(k - q, num_buckets, max_distance));
        }
    }
    Ok(Tensor::from_vec(v, s * s, device)?)
}
