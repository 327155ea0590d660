//! diffusers' `WanImageToVideoPipeline.__call__` (I2V, and FLF2V when a last image is given), for
//! Wan2.1 and for Wan2.2 I2V-A14B's two experts, split in steps so a caller can measure each
//! phase, drop the text encoder once the prompt embeddings exist, and hold one expert at a time:
//!
//! 1. [`WanPipeline::load`] reads every component of a diffusers folder ([`WanEncoders::load`] and
//!    [`WanPipeline::load_denoiser`] read the two halves separately; [`WanPipeline::load_base`]
//!    reads the VAE and the scheduler config only, and [`WanPipeline::load_expert`] /
//!    [`WanPipeline::drop_expert`] one denoising transformer, its LoRAs merged while it loads);
//! 2. [`WanPipeline::encode_conditioning`] runs UMT5 on the prompt (and the negative prompt when
//!    some expert's guidance is > 1) and CLIP on the first (and last) image when the transformer
//!    has an image branch (Wan2.1; Wan2.2 has none);
//! 3. [`WanPipeline::drop_encoders`] frees UMT5 and CLIP;
//! 4. [`WanPipeline::denoise`] builds the conditioning video, encodes it with the VAE, builds the
//!    4-channel frame mask and runs the sampler (UniPC or Euler, [`crate::sampler`]), each step
//!    by the expert that owns its timestep with that expert's guidance (the unconditional pass
//!    only when that guidance is > 1; the conditional and unconditional DiT passes as one batch
//!    of 2, or as two passes: [`GuidancePasses`]); [`WanPipeline::start_denoising`] and
//!    [`WanPipeline::denoise_expert`] run it one expert at a time;
//! 5. [`WanPipeline::decode`] decodes the latents to `[F, H, W, 3]` f32 in 0..1
//!    (`output_type="np"`).
//!
//! ## Two experts (Wan2.2)
//! `model_index.json`'s `boundary_ratio` splits the timesteps: `transformer` ([`Expert::High`])
//! runs those ≥ `boundary_ratio · num_train_timesteps` (compared in f32, as torch compares them),
//! `transformer_2` ([`Expert::Low`]) the rest, with `guidance_2` (default: `guidance`). Timesteps
//! decrease, so the high-noise expert's steps all come first. One difference from diffusers:
//! there, `guidance ≤ 1` turns classifier-free guidance off for both experts; here each expert
//! follows its own guidance.
//!
//! ## Known frames (chained mode)
//! diffusers pins the first pixel frame (and the last one for FLF2V) by putting the image into
//! the conditioning video (every other frame zero), encoding that video with the VAE and
//! setting the frame mask to 1 on those pixel frames (the mask has one channel per pixel
//! frame of a latent frame: the first pixel frame counted 4 times, so latent frame 0 covers it
//! alone and latent frame j ≥ 1 covers pixel frames 4j-3..=4j). [`VideoRequest::known_frames`]
//! uses the same mechanism for more frames: known frame k (0-based) becomes pixel frame k+1 of
//! the conditioning video and its mask entry is 1. With no known frames the result is
//! exactly the diffusers pipeline. CLIP still sees only `first` (and `last`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

use crate::checkpoint::{Expert, ModelIndex};
use crate::clip::{self, ClipVision, ImageProcessorConfig, PilFilter};
use crate::lora::Lora;
use crate::sampler::{Sampler, SamplerKind};
use crate::transformer::WanTransformer;
use crate::umt5::Umt5Encoder;
use crate::vae::WanVae;
use crate::{Error, Result};
use crate::{checkpoint, text};

/// How a denoising step with classifier-free guidance runs the DiT. The result is the same
/// either way (diffusers runs two passes); one batch of 2 is faster on a GPU and needs the
/// activations of two sequences at once (the runner's memory admission decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidancePasses {
    /// The conditional and the unconditional pass as one batch of 2.
    Batched,
    /// Two passes of batch 1 (half the activation memory).
    #[default]
    Separate,
}

/// What one video needs besides the prompts.
#[derive(Debug, Clone)]
pub struct VideoRequest {
    /// First frame (also CLIP's first image).
    pub first: RgbImage,
    /// Last frame (FLF2V); also CLIP's second image.
    pub last: Option<RgbImage>,
    /// Extra known frames right after `first` (pixel frames 1..=k), see the module docs.
    pub known_frames: Vec<RgbImage>,
    pub width: usize,
    pub height: usize,
    /// Pixel frames; rounded as diffusers does to 4N+1.
    pub frames: usize,
    pub steps: usize,
    /// Classifier-free guidance of the high-noise expert (Wan2.1: of every step); 1 or less
    /// skips the unconditional pass.
    pub guidance: f64,
    /// Guidance of the low-noise expert (Wan2.2); None: `guidance`.
    pub guidance_2: Option<f64>,
    pub sampler: SamplerKind,
    /// Replaces the scheduler config's `flow_shift`.
    pub flow_shift: Option<f64>,
    /// Seed of the initial noise when `latents` is None (not torch's generator).
    pub seed: u64,
    /// The exact initial noise `[1, 16, (F-1)/4+1, H/8, W/8]` (diffusers' `latents=`).
    pub latents: Option<Tensor>,
    /// Guidance as one batch of 2 or two passes (no effect when guidance ≤ 1).
    pub guidance_passes: GuidancePasses,
}

impl VideoRequest {
    /// Frames and size as the pipeline adjusts them: F to 4N+1 (rounded down), H and W down to
    /// multiples of vae_scale × patch (16).
    pub fn adjusted(&self) -> (usize, usize, usize) {
        adjusted_size(self.frames, self.height, self.width)
    }

    /// The guidance of `expert`'s steps.
    pub fn guidance_of(&self, expert: Expert) -> f64 {
        match expert {
            Expert::High => self.guidance,
            Expert::Low => self.guidance_2.unwrap_or(self.guidance),
        }
    }

    /// Whether some step runs classifier-free guidance, so the negative prompt is encoded.
    pub fn uses_cfg(&self) -> bool {
        self.guidance_of(Expert::High) > 1.0 || self.guidance_of(Expert::Low) > 1.0
    }
}

/// The latents of an adjusted video of `frames` × `height` × `width` pixels:
/// `(latent frames, latent height, latent width)` (the VAE's 4× temporal and 8×
/// spatial compression).
pub fn latent_shape(frames: usize, height: usize, width: usize) -> (usize, usize, usize) {
    ((frames - 1) / 4 + 1, height / 8, width / 8)
}

/// `(frames, height, width)` as the pipeline adjusts them (see [`VideoRequest::adjusted`]).
pub fn adjusted_size(frames: usize, height: usize, width: usize) -> (usize, usize, usize) {
    let f = if frames % 4 != 1 {
        frames / 4 * 4 + 1
    } else {
        frames
    }
    .max(1);
    (f, height / 16 * 16, width / 16 * 16)
}

/// The LoRAs merged into each expert as it loads (Wan2.1 has only [`Expert::High`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertLoras {
    pub high: Vec<Lora>,
    pub low: Vec<Lora>,
}

impl ExpertLoras {
    pub fn of(&self, expert: Expert) -> &[Lora] {
        match expert {
            Expert::High => &self.high,
            Expert::Low => &self.low,
        }
    }
}

/// Prompt and image embeddings (diffusers' `prompt_embeds`, `negative_prompt_embeds`, `image_embeds`).
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub prompt_embeds: Tensor,
    pub negative_embeds: Option<Tensor>,
    pub image_embeds: Option<Tensor>,
}

/// The prompt and image encoders (UMT5 + tokenizer, CLIP + its image processor), loaded apart
/// from the denoiser so a caller can drop them before the DiT is loaded.
pub struct WanEncoders {
    tokenizer: Tokenizer,
    text_encoder: Umt5Encoder,
    image_encoder: Option<(ClipVision, ImageProcessorConfig)>,
    device: Device,
}

impl WanEncoders {
    /// Loads `tokenizer/`, `text_encoder/` and, when the transformer config has an image branch
    /// (`image_dim`), `image_encoder/` and `image_processor/`, after checking the whole
    /// pipeline folder against its catalogue (so a missing DiT fails before any encoding).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        checkpoint::require(dir)?;
        let tokenizer = text::load_tokenizer(&dir.join(checkpoint::TOKENIZER_DIR))?;
        let text_encoder = Umt5Encoder::load(&dir.join(checkpoint::TEXT_ENCODER), dtype, device)?;
        let image_encoder = if checkpoint::has_image_branch(dir)? {
            let processor_dir = dir.join(checkpoint::IMAGE_PROCESSOR_DIR);
            Some((
                ClipVision::load(&dir.join(checkpoint::IMAGE_ENCODER), dtype, device)?,
                ImageProcessorConfig::load(&checkpoint::IMAGE_PROCESSOR.path(&processor_dir))?,
            ))
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            text_encoder,
            image_encoder,
            device: device.clone(),
        })
    }

    /// Prompt embeddings (and negative ones when `req` uses classifier-free guidance, the empty
    /// prompt when none is given) and CLIP penultimate states of `req.first` (and `req.last`)
    /// when there is an image branch.
    pub fn encode(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        req: &VideoRequest,
    ) -> Result<Conditioning> {
        let max_len = text::MAX_SEQUENCE_LENGTH;
        let te = &self.text_encoder;
        let prompt_embeds = text::encode_prompt(&self.tokenizer, te, prompt, max_len)?;
        let negative_embeds = if req.uses_cfg() {
            Some(text::encode_prompt(
                &self.tokenizer,
                te,
                negative_prompt.unwrap_or(""),
                max_len,
            )?)
        } else {
            None
        };
        let image_embeds = match &self.image_encoder {
            Some((enc, proc_cfg)) => {
                let mut imgs = vec![req.first.clone()];
                if let Some(l) = &req.last {
                    imgs.push(l.clone());
                }
                let pixels = clip::preprocess(&imgs, proc_cfg, &self.device)?;
                Some(enc.forward_penultimate(&pixels)?)
            }
            None => None,
        };
        Ok(Conditioning {
            prompt_embeds,
            negative_embeds,
            image_embeds,
        })
    }
}

/// The DiT under classifier-free guidance for one denoising loop: the prompt (and
/// image) contexts go through the embedders once, arranged for the loop's
/// [`GuidancePasses`]; [`GuidedDit::noise`] is then one step's noise prediction.
pub struct GuidedDit<'a> {
    transformer: &'a WanTransformer,
    contexts: Contexts,
    guidance: f64,
}

/// The embedded contexts: conditional only, the two apart, or stacked on the
/// batch axis (conditional first).
enum Contexts {
    Conditional {
        text: Tensor,
        img: Option<Tensor>,
    },
    Separate {
        text_c: Tensor,
        text_u: Tensor,
        img: Option<Tensor>,
    },
    Batched {
        text: Tensor,
        img: Option<Tensor>,
    },
}

impl<'a> GuidedDit<'a> {
    /// Embeds `cond`'s contexts for `transformer` under `guidance`; guidance ≤ 1
    /// runs the conditional pass alone.
    pub fn new(
        transformer: &'a WanTransformer,
        cond: &Conditioning,
        guidance: f64,
        passes: GuidancePasses,
    ) -> Result<Self> {
        let text_c = transformer.embed_text(&cond.prompt_embeds)?;
        let img = match &cond.image_embeds {
            Some(i) => transformer.embed_image(i)?,
            None => None,
        };
        let text_u = if guidance > 1.0 {
            let n = cond
                .negative_embeds
                .as_ref()
                .ok_or_else(|| Error::msg("guidance > 1 needs negative prompt embeddings"))?;
            Some(transformer.embed_text(n)?)
        } else {
            None
        };
        let contexts = match (text_u, passes) {
            (None, _) => Contexts::Conditional { text: text_c, img },
            (Some(text_u), GuidancePasses::Separate) => Contexts::Separate {
                text_c,
                text_u,
                img,
            },
            (Some(text_u), GuidancePasses::Batched) => {
                if text_u.dims() != text_c.dims() {
                    return Err(Error::msg(format!(
                        "batched guidance needs prompt embeddings of one shape, got {:?} and {:?}",
                        text_c.dims(),
                        text_u.dims()
                    )));
                }
                let img = match img {
                    Some(i) => Some(Tensor::cat(&[&i, &i], 0)?),
                    None => None,
                };
                Contexts::Batched {
                    text: Tensor::cat(&[&text_c, &text_u], 0)?,
                    img,
                }
            }
        };
        Ok(Self {
            transformer,
            contexts,
            guidance,
        })
    }

    /// The guided noise prediction for `input` `[1, C, F, H, W]` at timestep `t`:
    /// `uncond + guidance · (cond − uncond)`, as diffusers computes it.
    pub fn noise(&self, input: &Tensor, t: f32) -> Result<Tensor> {
        let tr = self.transformer;
        let guided = |cond: Tensor, uncond: Tensor| -> Result<Tensor> {
            Ok((&uncond + ((cond - &uncond)? * self.guidance)?)?)
        };
        match &self.contexts {
            Contexts::Conditional { text, img } => {
                Ok(tr.forward_embedded(input, &[t], text, img.as_ref())?)
            }
            Contexts::Separate {
                text_c,
                text_u,
                img,
            } => guided(
                tr.forward_embedded(input, &[t], text_c, img.as_ref())?,
                tr.forward_embedded(input, &[t], text_u, img.as_ref())?,
            ),
            Contexts::Batched { text, img } => {
                let both = tr.forward_embedded(
                    &Tensor::cat(&[input, input], 0)?,
                    &[t, t],
                    text,
                    img.as_ref(),
                )?;
                guided(both.narrow(0, 0, 1)?, both.narrow(0, 1, 1)?)
            }
        }
    }
}

/// A loaded pipeline: the VAE, the scheduler config, the experts that are loaded and, until
/// dropped, the encoders.
pub struct WanPipeline {
    pub dir: PathBuf,
    pub vae: WanVae,
    index: ModelIndex,
    high: Option<WanTransformer>,
    low: Option<WanTransformer>,
    loras: ExpertLoras,
    /// What the LoRAs left unused, one line per file (see [`crate::lora`]).
    lora_notes: Vec<String>,
    encoders: Option<WanEncoders>,
    scheduler_config: PathBuf,
    dtype: DType,
    device: Device,
}

/// A denoising run in progress: latents, sampler and the next step, so that the experts can be
/// loaded, run and dropped one after the other ([`WanPipeline::denoise_expert`]).
pub struct Denoising {
    latents: Tensor,
    /// Mask and VAE latents of the conditioning video, in the transformer dtype.
    condition: Tensor,
    sampler: Sampler,
    timesteps: Vec<f32>,
    /// The expert of each step.
    experts: Vec<Expert>,
    next: usize,
}

impl Denoising {
    /// Steps `expert` runs.
    pub fn steps_of(&self, expert: Expert) -> usize {
        self.experts.iter().filter(|&&e| e == expert).count()
    }

    /// The flow shift the sampler's sigmas use.
    pub fn shift(&self) -> f64 {
        self.sampler.shift()
    }

    /// The latents once every step ran.
    pub fn finish(self) -> Result<Tensor> {
        if self.next < self.timesteps.len() {
            return Err(Error::msg(format!(
                "denoising stopped after {} of {} steps ({} expert next)",
                self.next,
                self.timesteps.len(),
                self.experts[self.next].name()
            )));
        }
        Ok(self.latents)
    }
}

/// diffusers' `VideoProcessor.preprocess` for one PIL image: resize to W×H with Lanczos
/// (Pillow's algorithm; no-op at the same size), `/255`, `*2-1`: `[1, 3, H, W]` f32.
pub fn preprocess_frame(
    img: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let img = if (img.width() as usize, img.height() as usize) == (width, height) {
        img.clone()
    } else {
        clip::pil_resize(img, width as u32, height as u32, PilFilter::Lanczos)
    };
    let raw = img.as_raw();
    let mut out = vec![0f32; 3 * width * height];
    for i in 0..width * height {
        for c in 0..3 {
            let v = raw[i * 3 + c] as f32 / 255.0;
            out[c * width * height + i] = 2.0 * v - 1.0;
        }
    }
    Ok(Tensor::from_vec(out, (1, 3, height, width), device)?)
}

impl WanPipeline {
    /// Loads every component of the diffusers folder `dir`: the experts (with `loras`) and the
    /// text/image encoders in `dtype`, the VAE in f32 (as the reference pipelines run it).
    pub fn load(dir: &Path, dtype: DType, device: &Device, loras: &ExpertLoras) -> Result<Self> {
        let encoders = WanEncoders::load(dir, dtype, device)?;
        let mut pipe = Self::load_denoiser(dir, dtype, device, loras)?;
        pipe.encoders = Some(encoders);
        Ok(pipe)
    }

    /// Loads every expert (in `dtype`, with `loras`), the VAE (f32) and the scheduler config,
    /// no encoders.
    pub fn load_denoiser(
        dir: &Path,
        dtype: DType,
        device: &Device,
        loras: &ExpertLoras,
    ) -> Result<Self> {
        let mut pipe = Self::load_base(dir, dtype, device, loras)?;
        for expert in pipe.experts() {
            pipe.load_expert(expert)?;
        }
        Ok(pipe)
    }

    /// Loads the VAE (f32) and the scheduler config after checking the pipeline folder against
    /// its catalogue, the scheduler config and that `loras` name only experts the folder has;
    /// the experts are loaded later ([`Self::load_expert`], in `dtype`, with their `loras`).
    pub fn load_base(
        dir: &Path,
        dtype: DType,
        device: &Device,
        loras: &ExpertLoras,
    ) -> Result<Self> {
        checkpoint::require(dir)?;
        let index = ModelIndex::read(dir)?;
        if !loras.low.is_empty() && !index.experts().contains(&Expert::Low) {
            return Err(Error::msg(format!(
                "{}: LoRAs for the low-noise expert (transformer_2) were given, but this is a \
                 one-transformer (Wan2.1) model; give them for the high-noise expert (transformer)",
                dir.display()
            )));
        }
        let scheduler_config = checkpoint::SCHEDULER.path(&dir.join(checkpoint::SCHEDULER_DIR));
        // Fail now, not after minutes of work, on a bad scheduler config.
        Sampler::new(SamplerKind::UniPc, &scheduler_config, None, 1)?;
        let vae = WanVae::load(&dir.join(checkpoint::VAE), DType::F32, device)?;
        Ok(Self {
            dir: dir.to_owned(),
            vae,
            index,
            high: None,
            low: None,
            loras: loras.clone(),
            lora_notes: Vec::new(),
            encoders: None,
            scheduler_config,
            dtype,
            device: device.clone(),
        })
    }

    /// The experts of the model, in the order they run: `[High]` (Wan2.1) or `[High, Low]`.
    pub fn experts(&self) -> Vec<Expert> {
        self.index.experts()
    }

    fn slot(&mut self, expert: Expert) -> &mut Option<WanTransformer> {
        match expert {
            Expert::High => &mut self.high,
            Expert::Low => &mut self.low,
        }
    }

    /// Loads `expert` (a no-op when it is loaded) with its LoRAs merged.
    pub fn load_expert(&mut self, expert: Expert) -> Result<()> {
        if !self.experts().contains(&expert) {
            return Err(Error::msg(format!(
                "{} has no {} expert ({})",
                self.dir.display(),
                expert.name(),
                expert.component()
            )));
        }
        if self.slot(expert).is_some() {
            return Ok(());
        }
        let dir = self.dir.join(expert.component());
        let (model, notes) =
            WanTransformer::load_with_loras(&dir, self.dtype, &self.device, self.loras.of(expert))?;
        self.lora_notes.extend(notes);
        *self.slot(expert) = Some(model);
        Ok(())
    }

    /// Frees `expert`'s weights.
    pub fn drop_expert(&mut self, expert: Expert) {
        *self.slot(expert) = None;
    }

    /// The loaded `expert`.
    pub fn expert(&self, expert: Expert) -> Result<&WanTransformer> {
        match expert {
            Expert::High => self.high.as_ref(),
            Expert::Low => self.low.as_ref(),
        }
        .ok_or_else(|| {
            Error::msg(format!(
                "the {} expert ({}) is not loaded",
                expert.name(),
                expert.component()
            ))
        })
    }

    /// What the merged LoRAs left unused, one line per LoRA file.
    pub fn lora_notes(&self) -> &[String] {
        &self.lora_notes
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// True until [`Self::drop_encoders`] (and when loaded with [`Self::load`]).
    pub fn has_encoders(&self) -> bool {
        self.encoders.is_some()
    }

    /// Frees the UMT5 text encoder and the CLIP image encoder.
    pub fn drop_encoders(&mut self) {
        self.encoders = None;
    }

    /// See [`WanEncoders::encode`].
    pub fn encode_conditioning(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        req: &VideoRequest,
    ) -> Result<Conditioning> {
        let enc = self.encoders.as_ref().ok_or_else(|| {
            Error::msg("the text and image encoders are not loaded (or were dropped)")
        })?;
        enc.encode(prompt, negative_prompt, req)
    }

    /// The conditioning input (`[1, 4 + z, T', h, w]`: mask then normalised VAE latents of the
    /// conditioning video), as `prepare_latents` returns it.
    pub fn condition(&self, req: &VideoRequest) -> Result<Tensor> {
        let (f, h, w) = req.adjusted();
        if 1 + req.known_frames.len() + usize::from(req.last.is_some()) > f {
            return Err(Error::msg(format!(
                "{} known frames do not fit in {f} frames",
                1 + req.known_frames.len() + usize::from(req.last.is_some())
            )));
        }
        let dev = &self.device;
        let mut pinned = vec![false; f];
        let mut frames: Vec<Tensor> = Vec::with_capacity(f);
        frames.push(preprocess_frame(&req.first, w, h, dev)?);
        pinned[0] = true;
        for (k, img) in req.known_frames.iter().enumerate() {
            frames.push(preprocess_frame(img, w, h, dev)?);
            pinned[k + 1] = true;
        }
        let n_zero = f - frames.len() - usize::from(req.last.is_some());
        if n_zero > 0 {
            frames.push(Tensor::zeros((1, 3, n_zero, h, w), DType::F32, dev)?);
        }
        if let Some(l) = &req.last {
            frames.push(preprocess_frame(l, w, h, dev)?);
            pinned[f - 1] = true;
        }
        // Images are [1, 3, H, W]; the zero block is [1, 3, n, H, W].
        let parts = frames
            .iter()
            .map(|t| {
                if t.rank() == 4 {
                    t.unsqueeze(2)
                } else {
                    Ok(t.clone())
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let video = Tensor::cat(&parts, 2)?; // [1, 3, F, H, W]
        let latent = self.vae.encode(&video)?;
        let latent = self.vae.normalize(&latent.to_dtype(DType::F32)?)?;
        let (_, _, t_lat, lh, lw) = latent.dims5()?;

        // Mask: the first pixel frame counted 4 times, then 4 pixel frames per latent frame.
        let mut m = vec![0f32; 4 * t_lat];
        for (e, v) in m.iter_mut().enumerate() {
            let p = if e < 4 { 0 } else { e - 3 };
            if p < f && pinned[p] {
                *v = 1.0;
            }
        }
        // m is indexed [latent frame][channel]; the mask tensor is [1, 4, T', h, w].
        let mask = Tensor::from_vec(m, (t_lat, 4), dev)?
            .t()?
            .reshape((1, 4, t_lat, 1, 1))?
            .broadcast_as((1, 4, t_lat, lh, lw))?
            .contiguous()?;
        Ok(Tensor::cat(&[&mask, &latent], 1)?)
    }

    /// The initial noise: `req.latents` or seeded standard normal noise.
    pub fn initial_latents(&self, req: &VideoRequest) -> Result<Tensor> {
        let (f, h, w) = req.adjusted();
        let (lt, lh, lw) = latent_shape(f, h, w);
        let shape = (1, self.vae.config.z_dim, lt, lh, lw);
        match &req.latents {
            Some(l) => {
                if l.dims() != [shape.0, shape.1, shape.2, shape.3, shape.4] {
                    return Err(Error::msg(format!(
                        "latents have shape {:?}, this video needs {:?}",
                        l.dims(),
                        shape
                    )));
                }
                Ok(l.to_dtype(DType::F32)?.to_device(&self.device)?)
            }
            None => {
                let n = shape.0 * shape.1 * shape.2 * shape.3 * shape.4;
                let mut rng = rand::rngs::StdRng::seed_from_u64(req.seed);
                let mut v = Vec::with_capacity(n);
                while v.len() < n {
                    // Box-Muller
                    let u1: f64 = rng.random::<f64>().max(1e-300);
                    let u2: f64 = rng.random::<f64>();
                    let r = (-2.0 * u1.ln()).sqrt();
                    let a = 2.0 * std::f64::consts::PI * u2;
                    v.push((r * a.cos()) as f32);
                    if v.len() < n {
                        v.push((r * a.sin()) as f32);
                    }
                }
                Ok(Tensor::from_vec(v, shape, &self.device)?)
            }
        }
    }

    /// The denoising loop with every expert it needs loaded; returns the final latents
    /// `[1, z, T', h, w]` f32 (normalised space). `on_step(done, total)` is called after each step.
    pub fn denoise(
        &self,
        req: &VideoRequest,
        cond: &Conditioning,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let mut run = self.start_denoising(req)?;
        for expert in self.experts() {
            self.denoise_expert(&mut run, expert, req, cond, on_step)?;
        }
        run.finish()
    }

    /// The start of a denoising run: the conditioning input (VAE-encoded), the initial latents,
    /// the sampler's timesteps and the expert of each.
    pub fn start_denoising(&self, req: &VideoRequest) -> Result<Denoising> {
        let (sampler, timesteps, experts) = self.schedule(req)?;
        Ok(Denoising {
            latents: self.initial_latents(req)?,
            condition: self.condition(req)?.to_dtype(self.dtype)?,
            sampler,
            timesteps,
            experts,
            next: 0,
        })
    }

    /// The experts `req` needs, in the order they run, with their number of steps (an expert
    /// none of whose timesteps falls on its side of the boundary is left out: it need not load).
    pub fn steps_per_expert(&self, req: &VideoRequest) -> Result<Vec<(Expert, usize)>> {
        let (_, _, experts) = self.schedule(req)?;
        Ok(self
            .experts()
            .into_iter()
            .map(|e| (e, experts.iter().filter(|&&x| x == e).count()))
            .filter(|&(_, n)| n > 0)
            .collect())
    }

    /// The sampler of `req`, its timesteps and the expert of each.
    fn schedule(&self, req: &VideoRequest) -> Result<(Sampler, Vec<f32>, Vec<Expert>)> {
        let sampler = Sampler::new(
            req.sampler,
            &self.scheduler_config,
            req.flow_shift,
            req.steps,
        )?;
        let timesteps = sampler.timesteps();
        // diffusers compares the timestep tensor with the Python float boundary in f32.
        let boundary = self
            .index
            .boundary_ratio
            .map(|r| (r * sampler.num_train_timesteps() as f64) as f32);
        let experts = timesteps
            .iter()
            .map(|&t| match boundary {
                Some(b) if t < b => Expert::Low,
                _ => Expert::High,
            })
            .collect();
        Ok((sampler, timesteps, experts))
    }

    /// Runs the steps of `run` that belong to `expert` (which must be loaded), from where the
    /// run stands; the steps of the experts before it must have run.
    pub fn denoise_expert(
        &self,
        run: &mut Denoising,
        expert: Expert,
        req: &VideoRequest,
        cond: &Conditioning,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let total = run.timesteps.len();
        let first = run.experts.iter().position(|&e| e == expert);
        let Some(first) = first else {
            return Ok(());
        };
        if run.next != first {
            return Err(Error::msg(format!(
                "the {} expert's steps start at step {}, but the run is at step {}",
                expert.name(),
                first + 1,
                run.next + 1
            )));
        }
        let dit = GuidedDit::new(
            self.expert(expert)?,
            cond,
            req.guidance_of(expert),
            req.guidance_passes,
        )?;
        while run.next < total && run.experts[run.next] == expert {
            let i = run.next;
            let input = Tensor::cat(&[&run.latents.to_dtype(self.dtype)?, &run.condition], 1)?;
            let noise = dit.noise(&input, run.timesteps[i])?;
            run.latents = run.sampler.step(i, &noise, &run.latents)?;
            run.next += 1;
            on_step(run.next, total);
        }
        Ok(())
    }

    /// Denormalises and decodes latents: `[F, H, W, 3]` f32 in 0..1.
    pub fn decode(
        &self,
        latents: &Tensor,
        on_frame: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let z = self.vae.denormalize(&latents.to_dtype(DType::F32)?)?;
        let video = self.vae.decode_with(&z, on_frame)?; // [1, 3, F, H, W]
        let video = ((video / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        Ok(video.squeeze(0)?.permute((1, 2, 3, 0))?.contiguous()?)
    }

    /// Everything at once (what `video generate` runs): `[F, H, W, 3]` f32 in 0..1.
    pub fn generate(
        &self,
        req: &VideoRequest,
        prompt: &str,
        negative_prompt: Option<&str>,
    ) -> Result<Tensor> {
        let cond = self.encode_conditioning(prompt, negative_prompt, req)?;
        let latents = self.denoise(req, &cond, &mut |_, _| {})?;
        self.decode(&latents, &mut |_, _| {})
    }
}
