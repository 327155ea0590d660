//! The Wan2.1 diffusion transformer (`WanTransformer3DModel` in diffusers), with the image
//! cross-attention branch of the I2V / FLF2V models.
//!
//! Weight names are the ones diffusers saves (`patch_embedding`, `condition_embedder.*`,
//! `blocks.N.attn1/attn2/ffn/norm2/scale_shift_table`, `norm_out` (no weights), `proj_out`,
//! `scale_shift_table`). Everything runs in the weights' dtype except the layer norms and the
//! scale/shift/gate modulation, which run in f32 as diffusers' `FP32LayerNorm` and
//! `_keep_in_fp32_modules` do.

use std::path::Path;

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use kubewan_model_common::activation::{gelu_erf, gelu_tanh, gelu_tanh_owned, silu};
use kubewan_model_common::nn::{Linear, Mask, RmsNorm, attention_merged, linear};
use kubewan_model_common::rows;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::lora::{Lora, LoraMerge};

/// `transformer/config.json`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WanTransformerConfig {
    #[serde(default = "default_patch")]
    pub patch_size: Vec<usize>,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    #[serde(default = "yes")]
    pub cross_attn_norm: bool,
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub image_dim: Option<usize>,
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: usize,
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
}

fn default_patch() -> Vec<usize> {
    vec![1, 2, 2]
}
fn yes() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_len() -> usize {
    1024
}

impl WanTransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    /// The real Wan2.1-1.3B dimensions, with the I2V image branch added (image_dim 1280).
    pub fn wan_1_3b_i2v() -> Self {
        Self {
            patch_size: vec![1, 2, 2],
            num_attention_heads: 12,
            attention_head_dim: 128,
            in_channels: 36,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 8960,
            num_layers: 30,
            cross_attn_norm: true,
            qk_norm: default_qk_norm(),
            eps: 1e-6,
            image_dim: Some(1280),
            added_kv_proj_dim: Some(1536),
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

/// LayerNorm computed in f32 (diffusers' `FP32LayerNorm`), optional affine parameters.
#[derive(Debug, Clone)]
pub(crate) struct F32LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl F32LayerNorm {
    pub(crate) fn new(vb: VarBuilder, dim: usize, eps: f64, affine: bool) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(vb.get(dim, "weight")?.to_dtype(DType::F32)?),
                Some(vb.get(dim, "bias")?.to_dtype(DType::F32)?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
    }

    /// Returns f32. Contiguous CPU inputs run as one pass ([`rows::layer_norm`]).
    pub(crate) fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        if rows::applies(&x) {
            return rows::layer_norm(&x, self.weight.as_ref(), self.bias.as_ref(), self.eps);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let mut y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(w)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// `norm(x) · (1 + scale) + shift` in f32 (the blocks' adaLN modulation;
    /// `scale` and `shift` `[B, 1, dim]`), in one pass on the CPU for a norm
    /// without affine parameters.
    fn modulated(&self, x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let scale = (scale + 1.0)?;
        if self.weight.is_none() && self.bias.is_none() && rows::applies(&x) {
            return rows::layer_norm(&x, Some(&scale), Some(shift), self.eps);
        }
        self.forward_f32(&x)?
            .broadcast_mul(&scale)?
            .broadcast_add(shift)
    }
}

/// `x + update · gate` in f32 (`gate` `[B, 1, dim]`), in one pass on the CPU.
fn gated_residual(x: &Tensor, update: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let update = update.to_dtype(DType::F32)?;
    if rows::applies(x) && rows::applies(&update) {
        return rows::residual(x, &update, Some(gate));
    }
    x + update.broadcast_mul(gate)?
}

#[derive(Debug, Clone)]
struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    add_k_proj: Option<Linear>,
    add_v_proj: Option<Linear>,
    norm_added_k: Option<RmsNorm>,
    heads: usize,
    /// 1/sqrt(head_dim).
    scale: f64,
}

impl WanAttention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        eps: f64,
        added_kv_proj_dim: Option<usize>,
    ) -> Result<Self> {
        let (add_k_proj, add_v_proj, norm_added_k) = match added_kv_proj_dim {
            Some(a) => (
                Some(linear(a, dim, vb.pp("add_k_proj"))?),
                Some(linear(a, dim, vb.pp("add_v_proj"))?),
                Some(RmsNorm::new(dim, eps, vb.pp("norm_added_k"))?),
            ),
            None => (None, None, None),
        };
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("to_q"))?,
            to_k: linear(dim, dim, vb.pp("to_k"))?,
            to_v: linear(dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            norm_q: RmsNorm::new(dim, eps, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(dim, eps, vb.pp("norm_k"))?,
            add_k_proj,
            add_v_proj,
            norm_added_k,
            heads,
            scale: 1.0 / ((dim / heads) as f64).sqrt(),
        })
    }

    /// `[B, N, H*d]` -> a `[B, H, N, d]` view (attention reads it in place).
    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)
    }

    /// Self-attention when `context` is None (with RoPE), cross-attention otherwise.
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        context_img: Option<&Tensor>,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self
            .norm_q
            .forward_heads(&self.to_q.forward(x)?, self.heads, rope)?;
        let k = self
            .norm_k
            .forward_heads(&self.to_k.forward(ctx)?, self.heads, rope)?;
        let v = self.heads(&self.to_v.forward(ctx)?)?;
        let mut out = attention_merged(&q, &k, &v, Mask::None, self.scale)?;
        if let (Some(img), Some(akp), Some(avp), Some(nak)) = (
            context_img,
            &self.add_k_proj,
            &self.add_v_proj,
            &self.norm_added_k,
        ) {
            let ki = nak.forward_heads(&akp.forward(img)?, self.heads, None)?;
            let vi = self.heads(&avp.forward(img)?)?;
            out = (out + attention_merged(&q, &ki, &vi, Mask::None, self.scale)?)?;
        }
        self.to_out.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    tanh: bool,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize, inner: usize, out: usize, tanh: bool) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, inner, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, out, vb.pp("net.2"))?,
            tanh,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let h = if self.tanh {
            gelu_tanh_owned(h)?
        } else {
            gelu_erf(&h)?
        };
        self.proj_out.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: F32LayerNorm,
    attn1: WanAttention,
    attn2: WanAttention,
    norm2: Option<F32LayerNorm>,
    ffn: FeedForward,
    norm3: F32LayerNorm,
    scale_shift_table: Tensor, // f32 [1, 6, dim]
}

impl Block {
    fn new(vb: VarBuilder, cfg: &WanTransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let heads = cfg.num_attention_heads;
        Ok(Self {
            norm1: F32LayerNorm::new(vb.pp("norm1"), dim, cfg.eps, false)?,
            attn1: WanAttention::new(vb.pp("attn1"), dim, heads, cfg.eps, None)?,
            attn2: WanAttention::new(vb.pp("attn2"), dim, heads, cfg.eps, cfg.added_kv_proj_dim)?,
            norm2: if cfg.cross_attn_norm {
                Some(F32LayerNorm::new(vb.pp("norm2"), dim, cfg.eps, true)?)
            } else {
                None
            },
            ffn: FeedForward::new(vb.pp("ffn"), dim, cfg.ffn_dim, dim, true)?,
            norm3: F32LayerNorm::new(vb.pp("norm3"), dim, cfg.eps, false)?,
            scale_shift_table: vb
                .get((1, 6, dim), "scale_shift_table")?
                .to_dtype(DType::F32)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        text: &Tensor,
        img: Option<&Tensor>,
        temb6: &Tensor, // f32 [B, 6, dim]
        rope: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let mods = self.scale_shift_table.broadcast_add(temb6)?;
        let m = |i: usize| mods.narrow(1, i, 1); // [B, 1, dim]
        let (shift_msa, scale_msa, gate_msa) = (m(0)?, m(1)?, m(2)?);
        let (c_shift, c_scale, c_gate) = (m(3)?, m(4)?, m(5)?);

        let xf = x.to_dtype(DType::F32)?;
        let h = self
            .norm1
            .modulated(&xf, &scale_msa, &shift_msa)?
            .to_dtype(dtype)?;
        let a = self.attn1.forward(&h, None, None, Some(rope))?;
        let x = gated_residual(&xf, &a, &gate_msa)?.to_dtype(dtype)?;

        let h = match &self.norm2 {
            Some(n) => n.forward_f32(&x)?.to_dtype(dtype)?,
            None => x.clone(),
        };
        let a = self.attn2.forward(&h, Some(text), img, None)?;
        let x = (x + a)?;

        let xf = x.to_dtype(DType::F32)?;
        let h = self
            .norm3
            .modulated(&xf, &c_scale, &c_shift)?
            .to_dtype(dtype)?;
        let f = self.ffn.forward(&h)?;
        gated_residual(&xf, &f, &c_gate)?.to_dtype(dtype)
    }
}

#[derive(Debug, Clone)]
struct ImageEmbedding {
    norm1: F32LayerNorm,
    ff: FeedForward,
    norm2: F32LayerNorm,
    pos_embed: Option<Tensor>,
}

impl ImageEmbedding {
    fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut x = x.to_dtype(dtype)?;
        if let Some(pe) = &self.pos_embed {
            let (b, n, c) = x.dims3()?;
            let seq = pe.dim(1)?;
            if (b * n) % seq != 0 {
                candle_core::bail!(
                    "image embeddings {:?} do not fit the FLF2V position embedding of length {seq}",
                    x.shape()
                );
            }
            x = x.reshape((b * n / seq, seq, c))?.broadcast_add(pe)?;
        }
        let h = self.norm1.forward_f32(&x)?.to_dtype(dtype)?;
        let h = self.ff.forward(&h)?;
        self.norm2.forward_f32(&h)?.to_dtype(dtype)
    }
}

/// Precomputed RoPE frequency table (positions 0..max over the t, h and w parts).
#[derive(Debug, Clone)]
struct Rope {
    t_dim: usize,
    h_dim: usize,
    w_dim: usize,
    max_len: usize,
}

impl Rope {
    fn new(head_dim: usize, max_len: usize) -> Self {
        let h_dim = 2 * (head_dim / 6);
        let w_dim = h_dim;
        let t_dim = head_dim - h_dim - w_dim;
        Self {
            t_dim,
            h_dim,
            w_dim,
            max_len,
        }
    }

    fn inv_freqs(dim: usize) -> Vec<f64> {
        (0..dim / 2)
            .map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64))
            .collect()
    }

    /// cos, sin of shape `[F*H*W, head_dim/2]` (one angle per rotated pair), f32.
    fn tables(&self, f: usize, h: usize, w: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        if f > self.max_len || h > self.max_len || w > self.max_len {
            candle_core::bail!(
                "video grid {f}x{h}x{w} exceeds RoPE max length {}",
                self.max_len
            );
        }
        let ft = Self::inv_freqs(self.t_dim);
        let fh = Self::inv_freqs(self.h_dim);
        let fw = Self::inv_freqs(self.w_dim);
        let half = ft.len() + fh.len() + fw.len();
        let n = f * h * w;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for fi in 0..f {
            for hi in 0..h {
                for wi in 0..w {
                    let angles = ft
                        .iter()
                        .map(|x| x * fi as f64)
                        .chain(fh.iter().map(|x| x * hi as f64))
                        .chain(fw.iter().map(|x| x * wi as f64));
                    for a in angles {
                        cos.push(a.cos() as f32);
                        sin.push(a.sin() as f32);
                    }
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, half), device)?,
            Tensor::from_vec(sin, (n, half), device)?,
        ))
    }
}

/// The whole transformer.
#[derive(Debug, Clone)]
pub struct WanTransformer {
    pub config: WanTransformerConfig,
    patch_w: Tensor, // [inner, in_c * pt * ph * pw]
    patch_b: Tensor,
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_proj: Linear,
    text_linear_1: Linear,
    text_linear_2: Linear,
    image_embedder: Option<ImageEmbedding>,
    blocks: Vec<Block>,
    norm_out: F32LayerNorm,
    proj_out: Linear,
    scale_shift_table: Tensor, // f32 [1, 2, dim]
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl WanTransformer {
    pub fn new(vb: VarBuilder, config: WanTransformerConfig) -> Result<Self> {
        let cfg = &config;
        if let Some(q) = &cfg.qk_norm
            && q != "rms_norm_across_heads"
        {
            candle_core::bail!("unsupported qk_norm {q:?} (only rms_norm_across_heads)");
        }
        if cfg.patch_size.len() != 3 {
            candle_core::bail!("patch_size must have 3 entries, got {:?}", cfg.patch_size);
        }
        let dim = cfg.inner_dim();
        let (pt, ph, pw) = (cfg.patch_size[0], cfg.patch_size[1], cfg.patch_size[2]);
        let patch_w = vb
            .get((dim, cfg.in_channels, pt, ph, pw), "patch_embedding.weight")?
            .reshape((dim, cfg.in_channels * pt * ph * pw))?;
        let patch_b = vb.get(dim, "patch_embedding.bias")?;
        let ce = vb.pp("condition_embedder");
        let image_embedder = match cfg.image_dim {
            Some(idim) => {
                let ie = ce.pp("image_embedder");
                Some(ImageEmbedding {
                    norm1: F32LayerNorm::new(ie.pp("norm1"), idim, 1e-5, true)?,
                    ff: FeedForward::new(ie.pp("ff"), idim, idim, dim, false)?,
                    norm2: F32LayerNorm::new(ie.pp("norm2"), dim, 1e-5, true)?,
                    pos_embed: match cfg.pos_embed_seq_len {
                        Some(n) => Some(ie.get((1, n, idim), "pos_embed")?),
                        None => None,
                    },
                })
            }
            None => None,
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(vb.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let out_dim = cfg.out_channels() * pt * ph * pw;
        Ok(Self {
            patch_w,
            patch_b,
            time_linear_1: linear(cfg.freq_dim, dim, ce.pp("time_embedder.linear_1"))?,
            time_linear_2: linear(dim, dim, ce.pp("time_embedder.linear_2"))?,
            time_proj: linear(dim, 6 * dim, ce.pp("time_proj"))?,
            text_linear_1: linear(cfg.text_dim, dim, ce.pp("text_embedder.linear_1"))?,
            text_linear_2: linear(dim, dim, ce.pp("text_embedder.linear_2"))?,
            image_embedder,
            blocks,
            norm_out: F32LayerNorm::new(vb.pp("norm_out"), dim, cfg.eps, false)?,
            proj_out: linear(dim, out_dim, vb.pp("proj_out"))?,
            scale_shift_table: vb
                .get((1, 2, dim), "scale_shift_table")?
                .to_dtype(DType::F32)?,
            rope: Rope::new(cfg.attention_head_dim, cfg.rope_max_seq_len),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
        })
    }

    /// Loads the transformer component folder `dir` (`config.json`, `diffusion_pytorch_model*.safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        Self::load_with_loras(dir, dtype, device, &[]).map(|(model, _)| model)
    }

    /// [`Self::load`] with `loras` merged into the weights as they are read (see
    /// [`crate::lora`]); also returns what the LoRAs left unused, one note per file.
    pub fn load_with_loras(
        dir: &Path,
        dtype: DType,
        device: &Device,
        loras: &[Lora],
    ) -> crate::Result<(Self, Vec<String>)> {
        let config: WanTransformerConfig =
            checkpoint::TRANSFORMER_CONFIG.read_json(dir, "a Wan transformer config")?;
        let mut merge = LoraMerge::open(loras)?;
        let vb = checkpoint::TRANSFORMER_WEIGHTS.var_builder_with(
            dir,
            dtype,
            device,
            &mut |name: &str, tensor: Tensor| merge.apply(name, tensor),
        )?;
        let notes = merge.finish(dir)?;
        let model = Self::new(vb, config).map_err(|e| crate::Error::model(dir, e))?;
        Ok((model, notes))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn has_image_branch(&self) -> bool {
        self.image_embedder.is_some()
    }

    /// Sinusoidal timestep embedding (flip_sin_to_cos, no shift): `[B, freq_dim]`, f32.
    fn timestep_embedding(&self, t: &[f32]) -> Result<Tensor> {
        let dim = self.config.freq_dim;
        let half = dim / 2;
        let mut out = Vec::with_capacity(t.len() * dim);
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp())
            .collect();
        for &ts in t {
            let args: Vec<f32> = freqs.iter().map(|f| ts * f).collect();
            out.extend(args.iter().map(|a| a.cos()));
            out.extend(args.iter().map(|a| a.sin()));
            if dim % 2 == 1 {
                out.push(0.0);
            }
        }
        Tensor::from_vec(out, (t.len(), dim), &self.device)
    }

    /// Projects prompt embeddings `[B, L, text_dim]` through the text embedder (can be cached across steps).
    pub fn embed_text(&self, text: &Tensor) -> Result<Tensor> {
        let h = self.text_linear_1.forward(&text.to_dtype(self.dtype)?)?;
        self.text_linear_2.forward(&gelu_tanh(&h)?)
    }

    /// Projects CLIP image embeddings `[n, 257, image_dim]` (two images stacked for FLF2V).
    pub fn embed_image(&self, img: &Tensor) -> Result<Option<Tensor>> {
        match &self.image_embedder {
            Some(ie) => Ok(Some(ie.forward(img, self.dtype)?)),
            None => Ok(None),
        }
    }

    /// One forward: `hidden` `[B, C_in, F, H, W]`, `timestep` per batch element,
    /// `text` `[B, L, text_dim]`, `image` `[n, T, image_dim]` (raw CLIP states) -> `[B, C_out, F, H, W]`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        timestep: &[f32],
        text: &Tensor,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let text = self.embed_text(text)?;
        let img = match image {
            Some(i) => self.embed_image(i)?,
            None => None,
        };
        self.forward_embedded(hidden, timestep, &text, img.as_ref())
    }

    /// As [`Self::forward`] with text/image contexts already passed through the embedders.
    pub fn forward_embedded(
        &self,
        hidden: &Tensor,
        timestep: &[f32],
        text: &Tensor,
        img: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, c, f, h, w) = hidden.dims5()?;
        let (pt, ph, pw) = (cfg.patch_size[0], cfg.patch_size[1], cfg.patch_size[2]);
        if c != cfg.in_channels || f % pt != 0 || h % ph != 0 || w % pw != 0 {
            candle_core::bail!(
                "transformer input {:?} does not fit in_channels {} / patch {:?}",
                hidden.shape(),
                cfg.in_channels,
                cfg.patch_size
            );
        }
        if timestep.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", timestep.len());
        }
        let (ff, hh, ww) = (f / pt, h / ph, w / pw);
        let n = ff * hh * ww;
        let dim = cfg.inner_dim();

        let (cos, sin) = self.rope.tables(ff, hh, ww, &self.device)?;

        // Patch embedding as a matmul: [B, C, F', pt, H', ph, W', pw] -> [B, N, C*pt*ph*pw].
        let x = hidden
            .to_dtype(self.dtype)?
            .reshape(vec![b, c, ff, pt, hh, ph, ww, pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((b, n, c * pt * ph * pw))?;
        let mut x = x
            .broadcast_matmul(&self.patch_w.t()?)?
            .broadcast_add(&self.patch_b)?;

        // Time conditioning.
        let t = self.timestep_embedding(timestep)?;
        let temb = self.time_linear_2.forward(&silu(
            &self.time_linear_1.forward(&t.to_dtype(self.dtype)?)?,
        )?)?;
        let tproj = self.time_proj.forward(&silu(&temb)?)?;
        let temb6 = tproj.to_dtype(DType::F32)?.reshape((b, 6, dim))?;

        let text = text.to_dtype(self.dtype)?;
        let img = match img {
            Some(i) => Some(i.to_dtype(self.dtype)?),
            None => None,
        };
        for block in &self.blocks {
            x = block.forward(&x, &text, img.as_ref(), &temb6, (&cos, &sin))?;
        }

        let mods = self
            .scale_shift_table
            .broadcast_add(&temb.to_dtype(DType::F32)?.unsqueeze(1)?)?;
        let shift = mods.narrow(1, 0, 1)?;
        let scale = mods.narrow(1, 1, 1)?;
        let x = self
            .norm_out
            .modulated(&x, &scale, &shift)?
            .to_dtype(self.dtype)?;
        let x = self.proj_out.forward(&x)?;
        let co = cfg.out_channels();
        x.reshape(vec![b, ff, hh, ww, pt, ph, pw, co])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .contiguous()?
            .reshape((b, co, f, h, w))
    }
}
