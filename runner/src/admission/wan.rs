//! What a Wan2.1 segment needs per phase (see [`crate::stages::segment_wan`]
//! for the phases): the weights from the pipeline folder's headers, and the
//! activations derived from its configs and the segment's shapes.
//!
//! Notation: `s` bytes per element of the compute dtype, `F` pixel frames,
//! `H`×`W` pixels; latents have `F' = (F − 1)/4 + 1` frames of `h = H/8` ×
//! `w = W/8` and `z` channels. Every estimate counts the tensors that can be
//! alive at the same time in the largest step of the phase, so it is an upper
//! bound of the transient memory, not a measurement (the reports put the
//! measured peak next to it).
//!
//! **text_encode** — UMT5 over `L = 512` tokens (the prompt is padded to
//! `text::MAX_SEQUENCE_LENGTH`), `d` model dim, `n` heads of `d_kv`, `d_ff`:
//! per layer the hidden state and its norm `2·L·d·s`, q/k/v/o `4·L·n·d_kv·s`,
//! the relative-position bias every UMT5 layer recomputes `n·L²·4` (f32), one
//! chunk of scores `S(n, L, L)·(2s + 8)` (products in `s`, the f32 scores and
//! the f32 softmax), and the gated feed-forward `3·L·d_ff·s`; then CLIP over
//! the 2 keyframes (`t = (image_size/patch)² + 1` tokens each) alike with its
//! MLP `2·t·d_mlp·s`. The prompt embeddings it keeps are `2·L·d·4` (prompt
//! and negative prompt, f32). `S(b, q, k)` is the score block the shared
//! attention holds at once ([`attention_score_elems`]: the tiled path's
//! scratch on the CPU, one chunk of queries elsewhere).
//!
//! **denoise** — the DiT over `N = F'/p_t · h/p_h · w/p_w` tokens of dim `D`
//! (heads × head dim) with feed-forward `D_ff`: in a block the residual, the
//! f32 norm and its modulated copy, q, k, v, the f32 RoPE copies of q and k,
//! their rotated results and the attention output, `N·D·(8s + 12)`; the
//! feed-forward and its GELU `2·N·D_ff·s`; the largest score chunk of self-
//! (`N` keys), text- (512) and image-attention (`2t`) `S(heads, N, ·)·(2s + 8)`.
//! Contexts: the text embeddings (twice with guidance) `512·D·s` each and the
//! image embeddings `2t·D·s`. The loop state: the latents, the scheduler's
//! two model outputs and its last sample in f32 `4·z·F'·h·w·4`, the
//! conditioning input and the model input `(4 + z + C_in)·F'·h·w·s`, and the
//! noise predictions (two with guidance) `z·F'·h·w·s` each. With guidance as
//! one batch of 2 ([`GuidancePasses::Batched`]) the block, its score chunk
//! and the model input count twice (`b = 2` sequences), and the stacked
//! contexts add one more copy of the text and image embeddings. Before the loop
//! the VAE encodes the conditioning video: three copies of `F·3·H·W·4` (its
//! frames, their concatenation, the encoder's frames-first copy) plus the
//! encoder's chunk (below); the phase needs the larger of the two plus the
//! loop state.
//!
//! **vae_decode** — the decoder runs one latent frame at a time; at stage `i`
//! its res-blocks work on `T_i` frames (doubled by each temporal upsampling
//! before it) of `C_i` channels at `4^i·h·w` pixels. A res-block keeps five
//! tensors of `T_i` frames (its input, the f32 norm, the SiLU, the conv output
//! of one temporal tap, the running sum) and two of `T_i + 2` (the causal conv
//! input padded with the 2 cached frames, and the NHWC copy candle's CPU conv2d
//! makes of it): `(5·T_i + 2·(T_i + 2))·C_i·4^i·h·w·4` (f32), the largest stage
//! counting. The decoded video grows to `F·3·H·W·4`
//! and is copied twice (concatenated, clamped), and comes back to the host as
//! f32 then RGB8 frames `F·H·W·3·5`. The encoder's chunk is the same with 4
//! frames going down the stages.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use kubewan_model_common::nn::attention_score_elems;
use kubewan_wan::checkpoint::{self, Expert};
use kubewan_wan::clip::ClipVisionConfig;
use kubewan_wan::pipeline::{GuidancePasses, latent_shape};
use kubewan_wan::text::MAX_SEQUENCE_LENGTH;
use kubewan_wan::transformer::WanTransformerConfig;
use kubewan_wan::umt5::Umt5Config;
use kubewan_wan::vae::WanVaeConfig;

use super::{Activations, PhaseNeed, weights};
use crate::probe::phases;

/// Frames the causal convolutions keep from the previous chunk.
const VAE_CACHED_FRAMES: u64 = 2;
/// Pixel frames the encoder takes per chunk (after the first frame alone).
const VAE_ENCODER_CHUNK: u64 = 4;
/// Copies of a whole video alive at once: decoding keeps the frames, their
/// concatenation and the clamped result; encoding the conditioning video
/// keeps its frames, their concatenation and the encoder's frames-first copy.
const VIDEO_COPIES: u64 = 3;

/// The segment's shapes, as the pipeline runs them.
#[derive(Clone, Copy, Debug)]
pub struct WanShapes {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// Guidance above 1 runs the negative prompt too.
    pub guidance: f64,
    /// The dtype of the transformer and the encoders (the VAE runs in f32).
    pub dtype: DType,
    /// How guidance runs the DiT (no effect when guidance ≤ 1).
    pub guidance_passes: GuidancePasses,
}

/// The needs of a segment's four phases.
#[derive(Clone, Debug)]
pub struct WanNeeds {
    pub text_encode: PhaseNeed,
    pub video_load: PhaseNeed,
    pub denoise: PhaseNeed,
    pub vae_decode: PhaseNeed,
}

impl WanNeeds {
    /// The phases with the denoising models loaded: their load, the
    /// denoising and the decoding.
    pub fn model_phases(&self) -> [PhaseNeed; 3] {
        [
            self.video_load.clone(),
            self.denoise.clone(),
            self.vae_decode.clone(),
        ]
    }

    /// The same needs named as the phases of `expert` of a two-expert model
    /// run one at a time (`expert_<e>_load`, `expert_<e>_denoise`).
    pub fn for_expert(mut self, expert: Expert) -> WanNeeds {
        self.video_load.phase = phases::expert_load(expert);
        self.denoise.phase = phases::expert_denoise(expert);
        self
    }
}

/// The configs the estimates read.
struct Configs {
    transformer: WanTransformerConfig,
    vae: WanVaeConfig,
    text: Umt5Config,
    image: Option<ClipVisionConfig>,
}

fn configs(dir: &Path) -> Result<Configs> {
    let transformer = checkpoint::TRANSFORMER_CONFIG.read_json(
        &dir.join(checkpoint::TRANSFORMER),
        "a Wan transformer config",
    )?;
    let vae = checkpoint::VAE_CONFIG.read_json(&dir.join(checkpoint::VAE), "a Wan VAE config")?;
    let text = checkpoint::TEXT_ENCODER_CONFIG
        .read_json(&dir.join(checkpoint::TEXT_ENCODER), "a UMT5 config")?;
    let image = if checkpoint::has_image_branch(dir)? {
        Some(
            checkpoint::IMAGE_ENCODER_CONFIG
                .read_json(&dir.join(checkpoint::IMAGE_ENCODER), "a CLIP vision config")?,
        )
    } else {
        None
    };
    Ok(Configs {
        transformer,
        vae,
        text,
        image,
    })
}

/// The needs of the pipeline folder `dir` (checked) for `shapes` on
/// `device`, with the denoising transformers `resident` loaded together
/// (Wan2.1: its one transformer, [`Expert::High`]; Wan2.2: both experts, or
/// one at a time, or none for the VAE alone).
pub fn needs(
    dir: &Path,
    shapes: &WanShapes,
    device: &Device,
    resident: &[Expert],
) -> Result<WanNeeds> {
    let cfg = configs(dir).with_context(|| format!("sizing the Wan pipeline {}", dir.display()))?;
    let dtype = shapes.dtype;
    let mut encoders = vec![weights(dir, &checkpoint::TEXT_ENCODER_WEIGHTS, dtype)?];
    if cfg.image.is_some() {
        encoders.push(weights(dir, &checkpoint::IMAGE_ENCODER_WEIGHTS, dtype)?);
    }
    let mut denoiser = resident
        .iter()
        .map(|expert| weights(dir, &expert.weights(), dtype))
        .collect::<Result<Vec<_>>>()?;
    denoiser.push(weights(dir, &checkpoint::VAE_WEIGHTS, DType::F32)?);
    let phase = |phase, weights: &Vec<_>, loads, activations| PhaseNeed {
        phase,
        weights: weights.clone(),
        loads,
        activations,
    };
    Ok(WanNeeds {
        text_encode: phase(
            phases::TEXT_ENCODE,
            &encoders,
            true,
            text_encode_activations(&cfg, shapes, device),
        ),
        video_load: phase(phases::VIDEO_LOAD, &denoiser, true, Activations::default()),
        denoise: phase(
            phases::DENOISE,
            &denoiser,
            false,
            denoise_activations(&cfg, shapes, device),
        ),
        vae_decode: phase(
            phases::VAE_DECODE,
            &denoiser,
            false,
            decode_activations(&cfg.vae, shapes),
        ),
    })
}

fn size(dtype: DType) -> u64 {
    dtype.size_in_bytes() as u64
}

/// The shape of one attention for [`scores`].
struct AttentionShape {
    /// Batch × heads.
    batch: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    additive_mask: bool,
}

/// Bytes of one chunk of attention scores: the product in `s`, the f32
/// scores and the f32 softmax.
fn scores(device: &Device, a: AttentionShape, s: u64) -> u64 {
    let elems = attention_score_elems(
        device,
        a.batch,
        a.queries,
        a.keys,
        a.head_dim,
        a.additive_mask,
    );
    elems as u64 * (2 * s + 8)
}

/// CLIP tokens per image: the patches and the class token.
fn clip_tokens(c: &ClipVisionConfig) -> usize {
    (c.image_size / c.patch_size).pow(2) + 1
}

fn text_encode_activations(cfg: &Configs, shapes: &WanShapes, device: &Device) -> Activations {
    let s = size(shapes.dtype);
    let t = &cfg.text;
    let l = MAX_SEQUENCE_LENGTH as u64;
    let inner = (t.num_heads * t.d_kv) as u64;
    let umt5 = 2 * l * t.d_model as u64 * s
        + 4 * l * inner * s
        + t.num_heads as u64 * l * l * 4
        + scores(
            device,
            AttentionShape {
                batch: t.num_heads,
                queries: l as usize,
                keys: l as usize,
                head_dim: t.d_kv,
                // UMT5's relative position bias
                additive_mask: true,
            },
            s,
        )
        + 3 * l * t.d_ff as u64 * s;
    let clip = cfg.image.as_ref().map_or(0, |c| {
        let (n, tok) = (2, clip_tokens(c) as u64);
        let d = c.hidden_size as u64;
        let pixels = n * 3 * (c.image_size as u64).pow(2) * 4;
        pixels
            + n * tok * d * 2 * s
            + 4 * n * tok * d * s
            + scores(
                device,
                AttentionShape {
                    batch: 2 * c.num_attention_heads,
                    queries: tok as usize,
                    keys: tok as usize,
                    head_dim: c.hidden_size / c.num_attention_heads,
                    additive_mask: false,
                },
                s,
            )
            + 2 * n * tok * c.intermediate_size as u64 * s
    });
    let kept = 2 * l * t.d_model as u64 * 4;
    Activations {
        device_bytes: umt5.max(clip) + kept,
        host_bytes: 0,
        shapes: format!("{l} text tokens"),
    }
}

/// Latent frames, height and width of `shapes`.
fn latent_dims(shapes: &WanShapes) -> (u64, u64, u64) {
    let (f, h, w) = latent_shape(shapes.frames, shapes.height, shapes.width);
    (f as u64, h as u64, w as u64)
}

/// The DiT's token count for `shapes`.
pub fn dit_tokens(cfg: &WanTransformerConfig, shapes: &WanShapes) -> u64 {
    let (f, h, w) = latent_dims(shapes);
    let p = |i: usize| cfg.patch_size.get(i).copied().unwrap_or(1).max(1) as u64;
    (f / p(0)) * (h / p(1)) * (w / p(2))
}

/// Whether `shapes` runs guidance as one batch of 2 (guidance > 1 and
/// [`GuidancePasses::Batched`]).
fn batched(shapes: &WanShapes) -> bool {
    shapes.guidance > 1.0 && shapes.guidance_passes == GuidancePasses::Batched
}

/// What one DiT forward keeps alive beyond the weights for `shapes` (see the
/// module docs, **denoise**): a block over the sequences it runs at once, the
/// largest score chunk and the contexts. `image_tokens`: the image context's
/// tokens (0 without an image branch). The benchmark puts it beside the
/// measured peak.
pub fn dit_forward_bytes(
    tr: &WanTransformerConfig,
    shapes: &WanShapes,
    image_tokens: usize,
    device: &Device,
) -> u64 {
    let s = size(shapes.dtype);
    let n = dit_tokens(tr, shapes);
    let d = tr.inner_dim() as u64;
    let guided = shapes.guidance > 1.0;
    let b = 1 + u64::from(batched(shapes));
    let text_len = MAX_SEQUENCE_LENGTH;
    let score_chunk = [n as usize, text_len, image_tokens]
        .into_iter()
        .map(|keys| {
            scores(
                device,
                AttentionShape {
                    batch: b as usize * tr.num_attention_heads,
                    queries: n as usize,
                    keys,
                    head_dim: tr.attention_head_dim,
                    additive_mask: false,
                },
                s,
            )
        })
        .max()
        .unwrap_or(0);
    let block = b * (n * d * (8 * s + 12) + 2 * n * tr.ffn_dim as u64 * s) + score_chunk;
    let contexts =
        (1 + u64::from(guided) + 2 * u64::from(batched(shapes))) * text_len as u64 * d * s
            + b * image_tokens as u64 * d * s;
    block + contexts
}

fn denoise_activations(cfg: &Configs, shapes: &WanShapes, device: &Device) -> Activations {
    let s = size(shapes.dtype);
    let tr = &cfg.transformer;
    let n = dit_tokens(tr, shapes);
    let guided = shapes.guidance > 1.0;
    let b = 1 + u64::from(batched(shapes));
    let image_tokens = cfg.image.as_ref().map_or(0, |c| 2 * clip_tokens(c));
    let forward = dit_forward_bytes(tr, shapes, image_tokens, device);
    let (lf, lh, lw) = latent_dims(shapes);
    let z = cfg.vae.z_dim as u64;
    let area = lf * lh * lw;
    let loop_state = 4 * z * area * 4
        + (4 + z + b * tr.in_channels as u64) * area * s
        + (1 + u64::from(guided)) * z * area * s;
    let video = shapes.frames as u64 * 3 * shapes.height as u64 * shapes.width as u64 * 4;
    let encode = VIDEO_COPIES * video + encoder_chunk_bytes(&cfg.vae, shapes);
    Activations {
        device_bytes: forward.max(encode) + loop_state,
        host_bytes: 0,
        shapes: format!(
            "{n} tokens ({lf} latent frames of {lh}x{lw}), {}",
            match (guided, batched(shapes)) {
                (true, true) => "with guidance as one batch of 2",
                (true, false) => "with guidance",
                (false, _) => "no guidance",
            }
        ),
    }
}

/// What a VAE res-block keeps alive at once on `frames` frames of
/// `channels` × `pixels` (f32; see the module docs).
fn res_block_bytes(frames: u64, channels: u64, pixels: u64) -> u64 {
    (5 * frames + 2 * (frames + VAE_CACHED_FRAMES)) * channels * pixels * 4
}

/// The VAE encoder's largest stage for one chunk of 4 frames (f32).
fn encoder_chunk_bytes(vae: &WanVaeConfig, shapes: &WanShapes) -> u64 {
    let base = vae.base_dim as u64;
    let area = shapes.height as u64 * shapes.width as u64;
    let mut frames = VAE_ENCODER_CHUNK;
    let mut peak = 0;
    for (i, mult) in vae.dim_mult.iter().enumerate() {
        peak = peak.max(res_block_bytes(
            frames,
            base * *mult as u64,
            area >> (2 * i),
        ));
        if vae.temperal_downsample.get(i).copied().unwrap_or(false) {
            frames = frames.div_ceil(2);
        }
    }
    peak
}

/// The VAE decoder's largest stage for one latent frame (f32), as the
/// decoder's dims and temporal upsampling give it (see `vae::Decoder::new`).
fn decoder_chunk_bytes(vae: &WanVaeConfig, latent_area: u64) -> u64 {
    let base = vae.decoder_base_dim.unwrap_or(vae.base_dim) as u64;
    let stages = vae.dim_mult.len();
    let upsample_t: Vec<bool> = vae.temperal_downsample.iter().rev().copied().collect();
    let mut frames = 1;
    let mut peak = 0;
    for i in 0..stages {
        let channels = base * vae.dim_mult[stages - 1 - i] as u64;
        peak = peak.max(res_block_bytes(frames, channels, latent_area << (2 * i)));
        if i + 1 < stages && upsample_t.get(i).copied().unwrap_or(false) {
            frames *= 2;
        }
    }
    peak
}

/// The VAE decode phase's activations for `shapes` (see the module docs,
/// **vae_decode**); the benchmark puts them beside the measured peak.
pub fn decode_activations(vae: &WanVaeConfig, shapes: &WanShapes) -> Activations {
    let (_, lh, lw) = latent_dims(shapes);
    let pixels = shapes.frames as u64 * shapes.height as u64 * shapes.width as u64;
    let video = pixels * 3 * 4;
    Activations {
        device_bytes: decoder_chunk_bytes(vae, lh * lw) + VIDEO_COPIES * video,
        host_bytes: pixels * 3 * 5,
        shapes: format!(
            "{} frames of {}x{}",
            shapes.frames, shapes.width, shapes.height
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tiled_scratch_by_hand;
    use super::*;

    fn shapes(frames: usize, width: usize, height: usize) -> WanShapes {
        WanShapes {
            frames,
            width,
            height,
            guidance: 5.0,
            dtype: DType::BF16,
            guidance_passes: GuidancePasses::Separate,
        }
    }

    fn wan_14b() -> Configs {
        Configs {
            transformer: WanTransformerConfig {
                num_attention_heads: 40,
                num_layers: 40,
                ffn_dim: 13824,
                text_dim: 4096,
                ..WanTransformerConfig::wan_1_3b_i2v()
            },
            vae: serde_json::from_str(
                r#"{"base_dim":96,"z_dim":16,"dim_mult":[1,2,4,4],"num_res_blocks":2,
                   "temperal_downsample":[false,true,true],
                   "latents_mean":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],
                   "latents_std":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}"#,
            )
            .unwrap(),
            text: serde_json::from_str(
                r#"{"vocab_size":256384,"d_model":4096,"d_kv":64,"d_ff":10240,"num_layers":24,
                   "num_heads":64,"relative_attention_num_buckets":32,
                   "relative_attention_max_distance":128}"#,
            )
            .unwrap(),
            image: Some(
                serde_json::from_str(
                    r#"{"hidden_size":1280,"intermediate_size":5120,"num_hidden_layers":32,
                       "num_attention_heads":16,"image_size":224,"patch_size":14}"#,
                )
                .unwrap(),
            ),
        }
    }

    #[test]
    fn dit_tokens_follow_the_latent_grid() {
        let cfg = wan_14b();
        // 81 frames of 832x480: 21 latent frames of 60x104, patches of 2x2.
        assert_eq!(
            dit_tokens(&cfg.transformer, &shapes(81, 832, 480)),
            21 * 30 * 52
        );
        // 17 frames of 160x96: 5 latent frames of 12x20.
        assert_eq!(
            dit_tokens(&cfg.transformer, &shapes(17, 160, 96)),
            5 * 6 * 10
        );
    }

    #[test]
    fn denoise_activations_on_two_shapes() {
        let cfg = wan_14b();
        let cpu = Device::Cpu;
        // 720p-class 81 frames: every term by hand.
        let big = shapes(81, 832, 480);
        let n: u64 = 32760;
        let d: u64 = 5120;
        let block = n * d * (8 * 2 + 12) + 2 * n * 13824 * 2;
        // On the CPU attention holds no score matrix, only the tiled path's
        // scratch, the same for self-, text- and image-attention (head dim 128).
        let score = tiled_scratch_by_hand(128) * (2 * 2 + 8);
        let contexts = 2 * 512 * d * 2 + 2 * 257 * d * 2;
        let area = 21 * 60 * 104;
        let state = 4 * 16 * area * 4 + (4 + 16 + 36) * area * 2 + 2 * 16 * area * 2;
        let a = denoise_activations(&cfg, &big, &cpu);
        // Encoding the conditioning video needs less here than a DiT block.
        let encode = 3 * 81 * 3 * 480 * 832 * 4 + (5 * 4 + 2 * 6) * 96 * (480 * 832) * 4;
        assert!(encode < block + score + contexts);
        assert_eq!(a.device_bytes, block + score + contexts + state);
        assert!(
            a.shapes
                .starts_with("32760 tokens (21 latent frames of 60x104)"),
            "{}",
            a.shapes
        );
        // 17 frames of 416x240: 1950 tokens, where encoding the conditioning
        // video (three f32 copies, then the encoder's first stage at full size
        // with 96 channels) outweighs a DiT block.
        let small = denoise_activations(&cfg, &shapes(17, 416, 240), &cpu);
        let video = 3 * 17 * 3 * 240 * 416 * 4;
        let encoder = (5 * 4 + 2 * 6) * 96 * (240 * 416) * 4;
        let area = 5 * 30 * 52;
        let state = 4 * 16 * area * 4 + (4 + 16 + 36) * area * 2 + 2 * 16 * area * 2;
        assert_eq!(small.device_bytes, video + encoder + state);
        assert!(small.shapes.starts_with("1950 tokens"), "{}", small.shapes);

        // Guidance as one batch of 2: two sequences through a block (the
        // tiled scratch does not grow with the heads), the stacked contexts (prompt and
        // negative prompt once more, the image embeddings twice) and the
        // model input twice.
        let batched = denoise_activations(
            &cfg,
            &WanShapes {
                guidance_passes: GuidancePasses::Batched,
                ..big
            },
            &cpu,
        );
        let area = 21 * 60 * 104;
        let contexts = 4 * 512 * d * 2 + 2 * 2 * 257 * d * 2;
        let state = 4 * 16 * area * 4 + (4 + 16 + 2 * 36) * area * 2 + 2 * 16 * area * 2;
        assert_eq!(
            batched.device_bytes,
            2 * block + score + contexts + state,
            "{}",
            batched.shapes
        );
        assert!(batched.shapes.ends_with("with guidance as one batch of 2"));
    }

    #[test]
    fn decode_activations_on_two_shapes() {
        let cfg = wan_14b();
        // The full-resolution stage dominates: 5 tensors of 4 frames and 2 of
        // 4 + 2 cached frames, of 96 channels.
        let a = decode_activations(&cfg.vae, &shapes(81, 832, 480));
        let chunk = (5 * 4 + 2 * 6) * 96 * (480 * 832) * 4;
        let video = 81 * 832 * 480 * 3 * 4;
        assert_eq!(a.device_bytes, chunk + 3 * video);
        assert_eq!(a.host_bytes, 81 * 832 * 480 * 3 * 5);
        let b = decode_activations(&cfg.vae, &shapes(33, 416, 240));
        assert_eq!(
            b.device_bytes,
            (5 * 4 + 2 * 6) * 96 * (240 * 416) * 4 + 3 * 33 * 416 * 240 * 3 * 4
        );
    }

    #[test]
    fn the_tiny_pipeline_is_sized_from_its_headers() {
        let dir = tempfile::tempdir().unwrap();
        kubewan_wan::write_tiny_checkpoint(dir.path(), 0).unwrap();
        let n = needs(
            dir.path(),
            &shapes(17, 160, 96),
            &Device::Cpu,
            &[Expert::High],
        )
        .unwrap();
        let components = |p: &PhaseNeed| -> Vec<String> {
            p.weights.iter().map(|w| w.component.clone()).collect()
        };
        assert_eq!(components(&n.denoise), ["transformer", "vae"]);
        assert_eq!(n.denoise.weights[1].dtype, DType::F32);
        // bf16 halves the transformer's float weights.
        let f32_needs = needs(
            dir.path(),
            &WanShapes {
                dtype: DType::F32,
                ..shapes(17, 160, 96)
            },
            &Device::Cpu,
            &[Expert::High],
        )
        .unwrap();
        assert_eq!(
            f32_needs.denoise.weights[0].bytes,
            2 * n.denoise.weights[0].bytes
        );
        assert_eq!(
            components(&n.text_encode),
            ["text_encoder", "image_encoder"]
        );
        assert!(n.video_load.loads && !n.denoise.loads);
        assert!(n.vae_decode.activations.device_bytes > 0);
        // The VAE alone (two experts taking turns, between them), and an
        // expert's phases under its own names.
        let vae_only = needs(dir.path(), &shapes(17, 160, 96), &Device::Cpu, &[]).unwrap();
        assert_eq!(components(&vae_only.vae_decode), ["vae"]);
        let low = n.for_expert(Expert::Low);
        assert_eq!(
            (low.video_load.phase, low.denoise.phase),
            ("expert_low_load", "expert_low_denoise")
        );
    }
}
