//! CLIP vision encoder (Wan2.1's image branch: ViT-H/14 at 224 px in the released folders) and
//! its `CLIPImageProcessor`, loaded from the diffusers `image_encoder/` and `image_processor/`
//! folders.
//!
//! The pipeline uses `hidden_states[-2]`: the output of the second-to-last encoder layer (the
//! last layer and `post_layernorm` never run). Weights may carry transformers 4.x's
//! `vision_model.` prefix (the released folders) or not (transformers 5 saves without it).
//!
//! The image processor resizes with Pillow's algorithm (separable, antialiased convolution with
//! 8-bit fixed-point coefficients and an 8-bit intermediate image), which [`pil_resize`]
//! reproduces bit for bit (checked against Pillow 13 for all five filters), so pixel values match
//! transformers' PIL backend. The pipeline's `VideoProcessor` resizes with the same code (lanczos).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use image::RgbImage;
use kubewan_model_common::activation::{gelu_erf, gelu_tanh};
use kubewan_model_common::nn::{Linear, Mask, attention_merged, linear};
use serde::Deserialize;

pub use kubewan_model_common::pil::{PilFilter, pil_resize};

use crate::{Error, Result, checkpoint};

/// The fields of `image_encoder/config.json` this encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}

#[derive(Debug, Clone, Copy)]
enum Act {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

fn layer_norm(vb: VarBuilder, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(dim, "weight")?,
        vb.get(dim, "bias")?,
        eps,
    ))
}

/// CLIP's vision transformer up to the penultimate layer.
#[derive(Debug, Clone)]
pub struct ClipVision {
    /// [hidden, channels * patch * patch]
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
    layers: Vec<Layer>,
    act: Act,
    config: ClipVisionConfig,
    device: Device,
    dtype: DType,
}

impl ClipVisionConfig {
    /// Reads the image encoder's `config.json` (a vision config, or a full
    /// CLIPConfig that nests it under `vision_config`).
    pub fn load(path: &Path) -> Result<Self> {
        let raw: serde_json::Value = kubewan_model_common::read_json(path, "a CLIP vision config")?;
        let raw = match raw.get("vision_config") {
            Some(v) if v.is_object() => v.clone(),
            _ => raw,
        };
        serde_json::from_value(raw)
            .map_err(|e| Error::msg(format!("{}: not a CLIP vision config: {e}", path.display())))
    }
}

impl ClipVision {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or shards). Only the layers the
    /// penultimate hidden states need are read.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = ClipVisionConfig::load(&checkpoint::IMAGE_ENCODER_CONFIG.path(dir))?;
        let vb = checkpoint::IMAGE_ENCODER_WEIGHTS.var_builder(dir, dtype, device)?;
        Self::from_var_builder(&config, vb).map_err(|e| match e {
            Error::Candle(source) => Error::model(dir, source),
            other => other,
        })
    }

    pub fn from_var_builder(config: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb
        };
        let act = match config.hidden_act.as_str() {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            other => {
                return Err(Error::msg(format!(
                    "CLIP: unsupported hidden_act {other:?}"
                )));
            }
        };
        let d = config.hidden_size;
        let p = config.patch_size;
        let c = config.num_channels;
        if !config.image_size.is_multiple_of(p)
            || !d.is_multiple_of(config.num_attention_heads)
            || config.num_hidden_layers < 2
        {
            return Err(Error::msg(format!(
                "CLIP: inconsistent config (image_size {}, patch_size {p}, hidden {d}, heads {}, layers {})",
                config.image_size, config.num_attention_heads, config.num_hidden_layers
            )));
        }
        let emb = vb.pp("embeddings");
        let patch_weight = emb
            .get((d, c, p, p), "patch_embedding.weight")?
            .reshape((d, c * p * p))?;
        let class_embedding = emb.get(d, "class_embedding")?;
        let positions = (config.image_size / p).pow(2) + 1;
        let position_embedding = emb.get((positions, d), "position_embedding.weight")?;
        let pre_layernorm = layer_norm(vb.pp("pre_layrnorm"), d, config.layer_norm_eps)?;
        let head_dim = d / config.num_attention_heads;
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers - 1 {
            let l = vb.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(Layer {
                ln1: layer_norm(l.pp("layer_norm1"), d, config.layer_norm_eps)?,
                attn: Attention {
                    q: linear(d, d, a.pp("q_proj"))?,
                    k: linear(d, d, a.pp("k_proj"))?,
                    v: linear(d, d, a.pp("v_proj"))?,
                    out: linear(d, d, a.pp("out_proj"))?,
                    heads: config.num_attention_heads,
                    head_dim,
                },
                ln2: layer_norm(l.pp("layer_norm2"), d, config.layer_norm_eps)?,
                fc1: linear(d, config.intermediate_size, l.pp("mlp.fc1"))?,
                fc2: linear(config.intermediate_size, d, l.pp("mlp.fc2"))?,
            });
        }
        Ok(Self {
            patch_weight,
            class_embedding,
            position_embedding,
            pre_layernorm,
            layers,
            act,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Tokens per image: patches + the class token (257 for ViT-H/14 at 224).
    pub fn tokens_per_image(&self) -> usize {
        (self.config.image_size / self.config.patch_size).pow(2) + 1
    }

    /// `hidden_states[-2]` of transformers' `CLIPVisionModel` for `pixels` [n, 3, S, S]:
    /// [n, tokens, hidden] in the encoder's dtype.
    pub fn forward_penultimate(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        let s = self.config.image_size;
        let p = self.config.patch_size;
        if c != self.config.num_channels || h != s || w != s {
            return Err(Error::msg(format!(
                "CLIP: pixel values {:?} do not match the model ({} channels, {s}x{s})",
                pixels.dims(),
                self.config.num_channels
            )));
        }
        let g = s / p;
        let d = self.config.hidden_size;
        let x = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        // The stride-p convolution as a matmul over flattened (c, py, px) patches.
        let patches = x
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, g * g, c * p * p))?;
        let patch_embeds = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let class = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((n, 1, d))?;
        let x = Tensor::cat(&[&class.contiguous()?, &patch_embeds], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layernorm.forward(&x)?;
        for layer in &self.layers {
            let h = self.attention(&layer.attn, &layer.ln1.forward(&x)?)?;
            x = (x + h)?;
            let h = layer.fc1.forward(&layer.ln2.forward(&x)?)?;
            let h = match self.act {
                Act::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                Act::GeluErf => gelu_erf(&h)?,
                Act::GeluTanh => gelu_tanh(&h)?,
            };
            x = (x + layer.fc2.forward(&h)?)?;
        }
        Ok(x)
    }

    fn attention(&self, a: &Attention, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // [B, T, H·d] -> a [B, H, T, d] view: attention reads it in place.
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, a.heads, a.head_dim))?.transpose(1, 2)?)
        };
        let q = split(a.q.forward(x)?)?;
        let k = split(a.k.forward(x)?)?;
        let v = split(a.v.forward(x)?)?;
        let out = attention_merged(&q, &k, &v, Mask::None, (a.head_dim as f64).powf(-0.5))?;
        Ok(a.out.forward(&out)?)
    }
}

/// `image_processor/preprocessor_config.json` (CLIPImageProcessor).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "default_true")]
    pub do_resize: bool,
    #[serde(default)]
    pub size: Option<SizeSpec>,
    #[serde(default = "default_resample")]
    pub resample: u32,
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    #[serde(default)]
    pub crop_size: Option<SizeSpec>,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    #[serde(default = "default_mean")]
    pub image_mean: Vec<f64>,
    #[serde(default = "default_std")]
    pub image_std: Vec<f64>,
}

/// A size entry: `{"shortest_edge": N}`, `{"height": H, "width": W}` or a bare integer.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Int(u32),
    Dict {
        #[serde(default)]
        shortest_edge: Option<u32>,
        #[serde(default)]
        height: Option<u32>,
        #[serde(default)]
        width: Option<u32>,
    },
}

fn default_true() -> bool {
    true
}
fn default_resample() -> u32 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> Vec<f64> {
    vec![0.48145466, 0.4578275, 0.40821073]
}
fn default_std() -> Vec<f64> {
    vec![0.26862954, 0.26130258, 0.27577711]
}

impl ImageProcessorConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = kubewan_model_common::read_json(path, "a CLIP image processor config")?;
        if cfg.image_mean.len() != 3 || cfg.image_std.len() != 3 {
            return Err(Error::msg(format!(
                "{}: image_mean/image_std must have 3 values",
                path.display()
            )));
        }
        Ok(cfg)
    }

    /// Output (width, height) of the resize step for an input of `w` x `h`.
    fn resize_target(&self, w: u32, h: u32) -> Result<(u32, u32)> {
        match &self.size {
            Some(SizeSpec::Dict {
                shortest_edge: Some(s),
                ..
            })
            | Some(SizeSpec::Int(s)) => {
                // transformers' get_resize_output_image_size(default_to_square=False)
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (*s as f64 * long as f64 / short as f64) as u32;
                Ok(if w <= h {
                    (*s, new_long)
                } else {
                    (new_long, *s)
                })
            }
            Some(SizeSpec::Dict {
                height: Some(hh),
                width: Some(ww),
                ..
            }) => Ok((*ww, *hh)),
            _ => Err(Error::msg("CLIP image processor: unsupported `size`")),
        }
    }

    fn crop(&self) -> Result<(u32, u32)> {
        match &self.crop_size {
            Some(SizeSpec::Int(s)) => Ok((*s, *s)),
            Some(SizeSpec::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => Ok((*w, *h)),
            _ => Err(Error::msg("CLIP image processor: unsupported `crop_size`")),
        }
    }
}

/// The CLIP image processor: resize (shortest edge, Pillow filter), center crop, rescale,
/// normalise. Returns f32 pixel values [n, 3, crop_h, crop_w] on `device`.
pub fn preprocess(
    images: &[RgbImage],
    cfg: &ImageProcessorConfig,
    device: &Device,
) -> Result<Tensor> {
    if images.is_empty() {
        return Err(Error::msg("CLIP image processor: no images"));
    }
    let filter = PilFilter::from_code(cfg.resample).ok_or_else(|| {
        Error::msg(format!(
            "CLIP image processor: unsupported PIL resample filter {}",
            cfg.resample
        ))
    })?;
    let mut all = Vec::new();
    let mut dims = None;
    for img in images {
        let img = if cfg.do_resize {
            let (w, h) = cfg.resize_target(img.width(), img.height())?;
            pil_resize(img, w, h, filter)
        } else {
            img.clone()
        };
        let img = if cfg.do_center_crop {
            center_crop(&img, cfg.crop()?)
        } else {
            img
        };
        let (w, h) = (img.width() as usize, img.height() as usize);
        if dims.is_some_and(|d| d != (w, h)) {
            return Err(Error::msg(
                "CLIP image processor: images end up with different sizes",
            ));
        }
        dims = Some((w, h));
        let raw = img.as_raw();
        for c in 0..3 {
            for i in 0..w * h {
                let mut v = raw[i * 3 + c] as f64;
                if cfg.do_rescale {
                    v = (v * cfg.rescale_factor) as f32 as f64;
                }
                if cfg.do_normalize {
                    v = ((v as f32 - cfg.image_mean[c] as f32) / cfg.image_std[c] as f32) as f64;
                }
                all.push(v as f32);
            }
        }
    }
    let (w, h) = dims.expect("at least one image");
    Ok(Tensor::from_vec(all, (images.len(), 3, h, w), device)?)
}

/// transformers' center crop: offsets `(size - crop) / 2` rounded down, zero padding where the
/// image is smaller than the crop.
fn center_crop(img: &RgbImage, (cw, ch): (u32, u32)) -> RgbImage {
    let (w, h) = img.dimensions();
    if w >= cw && h >= ch {
        let left = (w - cw) / 2;
        let top = (h - ch) / 2;
        return image::imageops::crop_imm(img, left, top, cw, ch).to_image();
    }
    // Pad to at least the crop size (centred, ceil on the leading side), then crop.
    let nw = w.max(cw);
    let nh = h.max(ch);
    let pad_left = (nw - w).div_ceil(2);
    let pad_top = (nh - h).div_ceil(2);
    let mut padded = RgbImage::new(nw, nh);
    image::imageops::replace(&mut padded, img, pad_left as i64, pad_top as i64);
    let left = (nw - cw) / 2;
    let top = (nh - ch) / 2;
    image::imageops::crop_imm(&padded, left, top, cw, ch).to_image()
}
