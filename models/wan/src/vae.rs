//! The Wan2.1 causal 3-D VAE (`AutoencoderKLWan` in diffusers, the non-residual Wan2.1 variant).
//!
//! Video is processed in time chunks exactly as diffusers does: the encoder sees the first frame
//! alone and then chunks of 4 frames, the decoder one latent frame at a time; every causal conv
//! keeps the last 2 input frames of the previous chunk (the feature cache) in place of its causal
//! zero padding, and the temporal resamplers keep their own state (see [`Slot`]).
//!
//! Internally a video of one sample is `[T, C, H, W]` (frames first); the public API takes and
//! returns diffusers' `[B, C, T, H, W]`.

use std::path::Path;

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use kubewan_model_common::nn::{Mask, attention};
use serde::Deserialize;

use crate::checkpoint;
use crate::conv3d::CausalConv3d;

mod norm;

use norm::ChannelRmsNorm;

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "d96")]
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "d16")]
    pub z_dim: usize,
    #[serde(default = "dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "d2")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    #[serde(default = "tdown")]
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "d4")]
    pub scale_factor_temporal: usize,
    #[serde(default = "d8")]
    pub scale_factor_spatial: usize,
}

fn d96() -> usize {
    96
}
fn d16() -> usize {
    16
}
fn d2() -> usize {
    2
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d8() -> usize {
    8
}
fn dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn tdown() -> Vec<bool> {
    vec![false, true, true]
}

/// One entry of the feature cache.
#[derive(Debug, Clone)]
enum Slot {
    Empty,
    /// diffusers' `"Rep"`: the temporal upsampler saw its first chunk (which it does not upsample).
    Rep,
    Frames(Tensor),
}

#[derive(Debug, Default)]
struct Cache {
    slots: Vec<Slot>,
    idx: usize,
}

impl Cache {
    fn next(&mut self) -> usize {
        let i = self.idx;
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Slot::Empty);
        }
        self.idx += 1;
        i
    }
}

fn last_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let t = x.dim(0)?;
    x.narrow(0, t.saturating_sub(n), t.min(n))
}

/// A causal conv that reads/updates its slot of the feature cache (diffusers' repeated pattern).
fn cached_conv(conv: &CausalConv3d, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
    let i = cache.next();
    let mut cache_x = last_frames(x, 2)?;
    let prev = match &cache.slots[i] {
        Slot::Frames(p) => Some(p.clone()),
        _ => None,
    };
    if cache_x.dim(0)? < 2
        && let Some(p) = &prev
    {
        cache_x = Tensor::cat(&[&last_frames(p, 1)?, &cache_x], 0)?;
    }
    let y = conv.forward(x, prev.as_ref())?;
    cache.slots[i] = Slot::Frames(cache_x);
    Ok(y)
}

/// diffusers' `WanRMS_norm`: `F.normalize(x, dim=1) * sqrt(C) * gamma` over
/// the channels of `[T, C, H, W]`, which is an RMS norm over the channels.
/// F.normalize divides by the norm clamped at 1e-12; as an RMS norm that is
/// an eps of (1e-12)² / C on the mean square (they differ only for vectors
/// of norm below ~1e-12, which both map to ~0).
fn rms_norm(vb: VarBuilder, dim: usize, images: bool) -> Result<ChannelRmsNorm> {
    let gamma = if images {
        vb.get((dim, 1, 1), "gamma")?
    } else {
        vb.get((dim, 1, 1, 1), "gamma")?
    };
    ChannelRmsNorm::new(gamma, 1e-24 / dim as f64)
}

#[derive(Debug, Clone)]
struct ResBlock {
    norm1: ChannelRmsNorm,
    conv1: CausalConv3d,
    norm2: ChannelRmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResBlock {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            norm1: rms_norm(vb.pp("norm1"), in_dim, false)?,
            conv1: CausalConv3d::cube(vb.pp("conv1"), in_dim, out_dim, 3, 1)?,
            norm2: rms_norm(vb.pp("norm2"), out_dim, false)?,
            conv2: CausalConv3d::cube(vb.pp("conv2"), out_dim, out_dim, 3, 1)?,
            shortcut: if in_dim != out_dim {
                Some(CausalConv3d::cube(
                    vb.pp("conv_shortcut"),
                    in_dim,
                    out_dim,
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }
    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = self.norm1.forward_silu(x)?;
        let y = cached_conv(&self.conv1, &y, cache)?;
        let y = self.norm2.forward_silu(&y)?;
        let y = cached_conv(&self.conv2, &y, cache)?;
        y + h
    }
}

/// Single-head spatial self-attention per frame.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: ChannelRmsNorm,
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    dim: usize,
}

impl AttnBlock {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            norm: rms_norm(vb.pp("norm"), dim, true)?,
            qkv_w: vb.get((3 * dim, dim, 1, 1), "to_qkv.weight")?,
            qkv_b: vb
                .get(3 * dim, "to_qkv.bias")?
                .reshape((1, 3 * dim, 1, 1))?,
            proj_w: vb.get((dim, dim, 1, 1), "proj.weight")?,
            proj_b: vb.get(dim, "proj.bias")?.reshape((1, dim, 1, 1))?,
            dim,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (t, c, h, w) = x.dims4()?;
        let y = self.norm.forward(x)?;
        let qkv = y
            .conv2d(&self.qkv_w, 0, 1, 1, 1)?
            .broadcast_add(&self.qkv_b)?;
        // [T, 3C, HW] -> [T, 1, HW, 3C]
        let qkv = qkv
            .reshape((t, 3 * c, h * w))?
            .transpose(1, 2)?
            .unsqueeze(1)?;
        let q = qkv.narrow(D::Minus1, 0, c)?.contiguous()?;
        let k = qkv.narrow(D::Minus1, c, c)?.contiguous()?;
        let v = qkv.narrow(D::Minus1, 2 * c, c)?.contiguous()?;
        let o = attention(&q, &k, &v, Mask::None, 1.0 / (c as f64).sqrt())?; // [T, 1, HW, C]
        let o = o
            .squeeze(1)?
            .transpose(1, 2)?
            .reshape((t, self.dim, h, w))?
            .contiguous()?;
        let o = o
            .conv2d(&self.proj_w, 0, 1, 1, 1)?
            .broadcast_add(&self.proj_b)?;
        o + x
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResBlock,
    attn: AttnBlock,
    res1: ResBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            res0: ResBlock::new(vb.pp("resnets.0"), dim, dim)?,
            attn: AttnBlock::new(vb.pp("attentions.0"), dim)?,
            res1: ResBlock::new(vb.pp("resnets.1"), dim, dim)?,
        })
    }
    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ResampleMode {
    Up2d,
    Up3d,
    Down2d,
    Down3d,
}

#[derive(Debug, Clone)]
struct Resample {
    mode: ResampleMode,
    /// The 3×3 conv2d after the resize (`resample.1`), frame by frame.
    conv: CausalConv3d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    fn new(vb: VarBuilder, dim: usize, mode: ResampleMode, up_out: usize) -> Result<Self> {
        let out = match mode {
            ResampleMode::Up2d | ResampleMode::Up3d => up_out,
            _ => dim,
        };
        let time_conv = match mode {
            ResampleMode::Up3d => Some(CausalConv3d::new(
                vb.pp("time_conv"),
                dim,
                2 * dim,
                (3, 1, 1),
                (1, 1, 1),
                (1, 0, 0),
            )?),
            ResampleMode::Down3d => Some(CausalConv3d::new(
                vb.pp("time_conv"),
                dim,
                dim,
                (3, 1, 1),
                (2, 1, 1),
                (0, 0, 0),
            )?),
            _ => None,
        };
        let conv = match mode {
            ResampleMode::Up2d | ResampleMode::Up3d => {
                CausalConv3d::spatial(vb.pp("resample.1"), dim, out, 3, 1, 1)?
            }
            // Padded (0, 1) on each axis before the conv, as diffusers' ZeroPad2d does.
            ResampleMode::Down2d | ResampleMode::Down3d => {
                CausalConv3d::spatial(vb.pp("resample.1"), dim, out, 3, 2, 0)?
            }
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut x = x.clone();
        if self.mode == ResampleMode::Up3d {
            let tc = self.time_conv.as_ref().expect("upsample3d has a time conv");
            let i = cache.next();
            match cache.slots[i].clone() {
                Slot::Empty => cache.slots[i] = Slot::Rep,
                slot => {
                    let mut cache_x = last_frames(&x, 2)?;
                    if cache_x.dim(0)? < 2 {
                        let head = match &slot {
                            Slot::Frames(p) => last_frames(p, 1)?,
                            _ => cache_x.zeros_like()?,
                        };
                        cache_x = Tensor::cat(&[&head, &cache_x], 0)?;
                    }
                    let y = match &slot {
                        Slot::Frames(p) => tc.forward(&x, Some(p))?,
                        _ => tc.forward(&x, None)?,
                    };
                    cache.slots[i] = Slot::Frames(cache_x);
                    // [T, 2C, H, W] -> [T, 2, C, H, W] -> frames interleaved [2T, C, H, W]
                    let (t, c2, h, w) = y.dims4()?;
                    x = y.reshape((t * 2, c2 / 2, h, w))?;
                }
            }
        }
        let x = match self.mode {
            ResampleMode::Up2d | ResampleMode::Up3d => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)?
            }
            ResampleMode::Down2d | ResampleMode::Down3d => {
                x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?
            }
        };
        let x = self.conv.forward(&x, None)?;
        if self.mode == ResampleMode::Down3d {
            let tc = self
                .time_conv
                .as_ref()
                .expect("downsample3d has a time conv");
            let i = cache.next();
            match cache.slots[i].clone() {
                Slot::Frames(p) => {
                    let cache_x = last_frames(&x, 1)?;
                    let y = tc.forward(&Tensor::cat(&[&last_frames(&p, 1)?, &x], 0)?, None)?;
                    cache.slots[i] = Slot::Frames(cache_x);
                    return Ok(y);
                }
                _ => cache.slots[i] = Slot::Frames(x.clone()),
            }
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Res(Box<ResBlock>),
    Attn(AttnBlock),
    Resample(Resample),
}

impl Layer {
    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        match self {
            Layer::Res(r) => r.forward(x, cache),
            Layer::Attn(a) => a.forward(x),
            Layer::Resample(r) => r.forward(x, cache),
        }
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: CausalConv3d,
    down: Vec<Layer>,
    mid: MidBlock,
    norm_out: ChannelRmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let dim = cfg.base_dim;
        let mut dims = vec![dim];
        dims.extend(cfg.dim_mult.iter().map(|m| m * dim));
        let conv_in = CausalConv3d::cube(vb.pp("conv_in"), cfg.in_channels, dims[0], 3, 1)?;
        let mut down = Vec::new();
        let mut scale = 1.0f64;
        let n = cfg.dim_mult.len();
        let dvb = vb.pp("down_blocks");
        for i in 0..n {
            let mut in_dim = dims[i];
            let out_dim = dims[i + 1];
            for _ in 0..cfg.num_res_blocks {
                down.push(Layer::Res(Box::new(ResBlock::new(
                    dvb.pp(down.len()),
                    in_dim,
                    out_dim,
                )?)));
                if cfg.attn_scales.iter().any(|s| (*s - scale).abs() < 1e-12) {
                    down.push(Layer::Attn(AttnBlock::new(dvb.pp(down.len()), out_dim)?));
                }
                in_dim = out_dim;
            }
            if i != n - 1 {
                let mode = if cfg.temperal_downsample[i] {
                    ResampleMode::Down3d
                } else {
                    ResampleMode::Down2d
                };
                down.push(Layer::Resample(Resample::new(
                    dvb.pp(down.len()),
                    out_dim,
                    mode,
                    out_dim / 2,
                )?));
                scale /= 2.0;
            }
        }
        let out_dim = dims[n];
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), out_dim)?,
            norm_out: rms_norm(vb.pp("norm_out"), out_dim, false)?,
            conv_out: CausalConv3d::cube(vb.pp("conv_out"), out_dim, cfg.z_dim * 2, 3, 1)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut x = cached_conv(&self.conv_in, x, cache)?;
        for l in &self.down {
            x = l.forward(&x, cache)?;
        }
        let x = self.mid.forward(&x, cache)?;
        let x = self.norm_out.forward_silu(&x)?;
        cached_conv(&self.conv_out, &x, cache)
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResBlock>,
    upsampler: Option<Resample>,
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: ChannelRmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let dim = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
        let n = cfg.dim_mult.len();
        let mut dims = vec![dim * cfg.dim_mult[n - 1]];
        dims.extend(cfg.dim_mult.iter().rev().map(|m| m * dim));
        let temperal_upsample: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up = Vec::new();
        for i in 0..n {
            let mut in_dim = dims[i];
            let out_dim = dims[i + 1];
            if i > 0 {
                in_dim /= 2;
            }
            let bvb = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut cur = in_dim;
            for j in 0..cfg.num_res_blocks + 1 {
                resnets.push(ResBlock::new(bvb.pp("resnets").pp(j), cur, out_dim)?);
                cur = out_dim;
            }
            let upsampler = if i != n - 1 {
                let mode = if temperal_upsample[i] {
                    ResampleMode::Up3d
                } else {
                    ResampleMode::Up2d
                };
                Some(Resample::new(
                    bvb.pp("upsamplers.0"),
                    out_dim,
                    mode,
                    out_dim / 2,
                )?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsampler });
        }
        let out_dim = dims[n];
        Ok(Self {
            conv_in: CausalConv3d::cube(vb.pp("conv_in"), cfg.z_dim, dims[0], 3, 1)?,
            mid: MidBlock::new(vb.pp("mid_block"), dims[0])?,
            up,
            norm_out: rms_norm(vb.pp("norm_out"), out_dim, false)?,
            conv_out: CausalConv3d::cube(vb.pp("conv_out"), out_dim, cfg.out_channels, 3, 1)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let x = cached_conv(&self.conv_in, x, cache)?;
        let mut x = self.mid.forward(&x, cache)?;
        for b in &self.up {
            for r in &b.resnets {
                x = r.forward(&x, cache)?;
            }
            if let Some(u) = &b.upsampler {
                x = u.forward(&x, cache)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        cached_conv(&self.conv_out, &x, cache)
    }
}

/// The VAE: encode to the posterior mean, decode with clamping to [-1, 1].
#[derive(Debug, Clone)]
pub struct WanVae {
    pub config: WanVaeConfig,
    encoder: Encoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
    dtype: DType,
    device: Device,
}

impl WanVae {
    pub fn new(vb: VarBuilder, config: WanVaeConfig) -> Result<Self> {
        if config.is_residual || config.patch_size.is_some() {
            candle_core::bail!(
                "only the Wan2.1 VAE is supported (is_residual false, no patch_size); this is a Wan2.2 VAE"
            );
        }
        if config.latents_mean.len() != config.z_dim || config.latents_std.len() != config.z_dim {
            candle_core::bail!(
                "latents_mean/latents_std must have z_dim = {} entries",
                config.z_dim
            );
        }
        let z = config.z_dim;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &config)?,
            quant_conv: CausalConv3d::cube(vb.pp("quant_conv"), 2 * z, 2 * z, 1, 0)?,
            post_quant_conv: CausalConv3d::cube(vb.pp("post_quant_conv"), z, z, 1, 0)?,
            decoder: Decoder::new(vb.pp("decoder"), &config)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
        })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model*.safetensors`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config: WanVaeConfig = checkpoint::VAE_CONFIG.read_json(dir, "a Wan VAE config")?;
        let vb = checkpoint::VAE_WEIGHTS.var_builder(dir, dtype, device)?;
        Self::new(vb, config).map_err(|e| crate::Error::model(dir, e))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `[B, 3, T, H, W]` in [-1, 1] -> posterior mean `[B, z, 1 + (T-1)/4, H/8, W/8]`
    /// (`retrieve_latents(..., sample_mode="argmax")`), not normalised.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        let b = video.dim(0)?;
        let mut outs = Vec::with_capacity(b);
        for i in 0..b {
            let frames = video
                .get(i)?
                .to_dtype(self.dtype)?
                .transpose(0, 1)?
                .contiguous()?; // [T, C, H, W]
            let t = frames.dim(0)?;
            let mut cache = Cache::default();
            let mut chunks = Vec::new();
            let n = 1 + (t.max(1) - 1) / 4;
            for k in 0..n {
                cache.idx = 0;
                let chunk = if k == 0 {
                    frames.narrow(0, 0, 1)?
                } else {
                    let start = 1 + 4 * (k - 1);
                    frames.narrow(0, start, 4.min(t - start))?
                };
                chunks.push(self.encoder.forward(&chunk, &mut cache)?);
            }
            let enc = self.quant_conv.forward(&Tensor::cat(&chunks, 0)?, None)?;
            let mean = enc.narrow(1, 0, self.config.z_dim)?; // [T', z, h, w]
            outs.push(mean.transpose(0, 1)?.unsqueeze(0)?);
        }
        Tensor::cat(&outs, 0)?.contiguous()
    }

    /// `[B, z, T', h, w]` (un-normalised latents) -> `[B, 3, 1 + 4(T'-1), 8h, 8w]` clamped to [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_with(z, &mut |_, _| {})
    }

    /// As [`Self::decode`], calling `on_frame(done, total)` after each latent frame.
    pub fn decode_with(
        &self,
        z: &Tensor,
        on_frame: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = z.dim(0)?;
        let mut outs = Vec::with_capacity(b);
        for i in 0..b {
            let lat = z
                .get(i)?
                .to_dtype(self.dtype)?
                .transpose(0, 1)?
                .contiguous()?;
            let x = self.post_quant_conv.forward(&lat, None)?;
            let t = x.dim(0)?;
            let mut cache = Cache::default();
            let mut frames = Vec::with_capacity(t);
            for k in 0..t {
                cache.idx = 0;
                frames.push(self.decoder.forward(&x.narrow(0, k, 1)?, &mut cache)?);
                on_frame(k + 1, t);
            }
            let out = Tensor::cat(&frames, 0)?.clamp(-1f32, 1f32)?;
            outs.push(out.transpose(0, 1)?.unsqueeze(0)?);
        }
        Tensor::cat(&outs, 0)?.contiguous()
    }

    fn stats(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        let z = self.config.z_dim;
        let mean = Tensor::from_slice(&self.config.latents_mean, (1, z, 1, 1, 1), &self.device)?
            .to_dtype(dtype)?;
        let std = Tensor::from_slice(&self.config.latents_std, (1, z, 1, 1, 1), &self.device)?
            .to_dtype(dtype)?;
        Ok((mean, std))
    }

    /// `(latents - mean) * (1 / std)`, as the pipeline normalises the condition latents.
    pub fn normalize(&self, latents: &Tensor) -> Result<Tensor> {
        let (mean, std) = self.stats(latents.dtype())?;
        latents.broadcast_sub(&mean)?.broadcast_mul(&std.recip()?)
    }

    /// `latents / (1 / std) + mean`, as the pipeline denormalises before decoding.
    pub fn denormalize(&self, latents: &Tensor) -> Result<Tensor> {
        let (mean, std) = self.stats(latents.dtype())?;
        latents.broadcast_div(&std.recip()?)?.broadcast_add(&mean)
    }
}
