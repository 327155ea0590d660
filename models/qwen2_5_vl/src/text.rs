//! The Qwen2.5-VL text decoder (`model.*` / `model.language_model.*`): GQA
//! attention with bias on q/k/v, M-RoPE over (temporal, height, width) position
//! ids split by `mrope_section`, SwiGLU MLP, RMSNorm and a KV cache.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use kubewan_model_common::activation::swiglu;
use kubewan_model_common::nn::{Linear, Mask, RmsNorm, attention_merged, linear, linear_no_bias};

use crate::config::TextConfig;
use crate::nn::{apply_rotary, inv_freq};

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cache: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let hd = cfg.head_dim();
        let (h, nh, nkv) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        Ok(Self {
            q_proj: linear(h, nh * hd, vb.pp("q_proj"))?,
            k_proj: linear(h, nkv * hd, vb.pp("k_proj"))?,
            v_proj: linear(h, nkv * hd, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(nh * hd, h, vb.pp("o_proj"))?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            cache: None,
        })
    }

    fn forward(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Mask) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let shape = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, l, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = shape(self.q_proj.forward(x)?, self.heads)?;
        let k = shape(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = shape(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let (k, v) = match self.cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.cache = Some((k.clone(), v.clone()));
        // Grouped-query attention: the shared attention repeats the k/v heads itself.
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        self.o_proj
            .forward(&attention_merged(&q, &k, &v, mask, scale)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    self_attn: Attention,
    mlp: Mlp,
}

impl Layer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
    fn forward(&mut self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Mask) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + h)?;
        &x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
    }
}

#[derive(Debug, Clone)]
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: TextConfig,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

impl TextModel {
    /// `vb` at the decoder's prefix (`model` or `model.language_model`), `head_vb` at the root.
    pub fn new(cfg: &TextConfig, tie: bool, vb: VarBuilder, head_vb: VarBuilder) -> Result<Self> {
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if tie {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, head_vb.pp("lm_head"))?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            lm_head,
            inv_freq: inv_freq(cfg.head_dim(), cfg.rope_theta),
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::new(ids, &self.device)?;
        self.embed_tokens.forward(&t)
    }

    pub fn clear_cache(&mut self) {
        for l in &mut self.layers {
            l.self_attn.cache = None;
        }
    }

    /// cos/sin for 3-D position ids (`pos[axis][token]`), M-RoPE sections interleaved by axis.
    fn rope(&self, pos: &[Vec<i64>; 3]) -> Result<(Tensor, Tensor)> {
        let l = pos[0].len();
        let hd = self.cfg.head_dim();
        let half = hd / 2;
        let mut axis_of = Vec::with_capacity(half);
        for (i, &n) in self.cfg.mrope_section.iter().enumerate() {
            axis_of.extend(std::iter::repeat_n(i % 3, n));
        }
        let mut cos = vec![0f32; l * hd];
        let mut sin = vec![0f32; l * hd];
        for t in 0..l {
            for (j, f) in self.inv_freq.iter().enumerate() {
                let a = pos[axis_of[j]][t] as f32 * f;
                let (s, c) = a.sin_cos();
                cos[t * hd + j] = c;
                cos[t * hd + half + j] = c;
                sin[t * hd + j] = s;
                sin[t * hd + half + j] = s;
            }
        }
        let cos = Tensor::from_vec(cos, (1, 1, l, hd), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (1, 1, l, hd), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Runs `embeds` (L, hidden) at positions `pos` after what the cache holds; returns the
    /// f32 logits of the last position.
    pub fn forward(&mut self, embeds: &Tensor, pos: &[Vec<i64>; 3]) -> Result<Tensor> {
        let l = embeds.dim(0)?;
        let (cos, sin) = self.rope(pos)?;
        // A prefill of several tokens is causal (over what the cache holds);
        // one decoded token sees everything.
        let mask = if l > 1 { Mask::Causal } else { Mask::None };
        let mut x = embeds.unsqueeze(0)?;
        for layer in &mut self.layers {
            x = layer.forward(&x, &cos, &sin, mask)?;
        }
        let x = self.norm.forward(&x.narrow(1, l - 1, 1)?)?;
        self.lm_head
            .forward(&x)?
            .flatten_all()?
            .to_dtype(DType::F32)
    }
}
