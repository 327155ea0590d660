//! diffusers' `WanImageToVideoPipeline.__call__` (I2V, and FLF2V when a last image is given),
//! split in steps so a caller can measure each phase and drop the text encoder once the prompt
//! embeddings exist:
//!
//! 1. [`WanPipeline::load`] reads every component of a diffusers folder ([`WanEncoders::load`] and
//!    [`WanPipeline::load_denoiser`] read the two halves separately);
//! 2. [`WanPipeline::encode_conditioning`] runs UMT5 on the prompt (and the negative prompt when
//!    guidance > 1) and CLIP on the first (and last) image;
//! 3. [`WanPipeline::drop_encoders`] frees UMT5 and CLIP;
//! 4. [`WanPipeline::denoise`] builds the conditioning video, encodes it with the VAE, builds the
//!    4-channel frame mask and runs the UniPC loop with classifier-free guidance;
//! 5. [`WanPipeline::decode`] decodes the latents to `[F, H, W, 3]` f32 in 0..1
//!    (`output_type="np"`).
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

use crate::clip::{self, ClipVision, ImageProcessorConfig, PilFilter};
use crate::scheduler::FlowUniPc;
use crate::text;
use crate::transformer::WanTransformer;
use crate::umt5::Umt5Encoder;
use crate::vae::WanVae;
use crate::{Error, Result};

/// Files (relative to the model folder) a Wan pipeline needs besides the weights, which are
/// `<component>/diffusion_pytorch_model.safetensors` (transformer, vae) and
/// `<component>/model.safetensors` (text_encoder, image_encoder), or their sharded indexes.
pub fn required_files() -> Vec<&'static str> {
    vec![
        "model_index.json",
        "transformer/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "image_encoder/config.json",
        "image_processor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
    ]
}

/// Weight stems per component: (folder, stem).
pub const WEIGHTS: [(&str, &str); 4] = [
    ("transformer", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("image_encoder", "model"),
];

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
    pub guidance: f64,
    /// Replaces the scheduler config's `flow_shift`.
    pub flow_shift: Option<f64>,
    /// Seed of the initial noise when `latents` is None (not torch's generator).
    pub seed: u64,
    /// The exact initial noise `[1, 16, (F-1)/4+1, H/8, W/8]` (diffusers' `latents=`).
    pub latents: Option<Tensor>,
}

impl VideoRequest {
    /// Frames and size as the pipeline adjusts them: F to 4N+1 (rounded down), H and W down to
    /// multiples of vae_scale × patch (16).
    pub fn adjusted(&self) -> (usize, usize, usize) {
        let f = if self.frames % 4 != 1 {
            self.frames / 4 * 4 + 1
        } else {
            self.frames
        }
        .max(1);
        (f, self.height / 16 * 16, self.width / 16 * 16)
    }
}

/// Prompt and image embeddings (diffusers' `prompt_embeds`, `negative_prompt_embeds`, `image_embeds`).
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub prompt_embeds: Tensor,
    pub negative_embeds: Option<Tensor>,
    pub image_embeds: Option<Tensor>,
    pub guidance: f64,
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
    /// (`image_dim`), `image_encoder/` and `image_processor/`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let tcfg: crate::transformer::WanTransformerConfig = kubewan_model_common::read_json(
            &dir.join("transformer/config.json"),
            "a Wan transformer config",
        )?;
        let tokenizer = text::load_tokenizer(&dir.join("tokenizer"))?;
        let text_encoder = Umt5Encoder::load(&dir.join("text_encoder"), dtype, device)?;
        let image_encoder = if tcfg.image_dim.is_some() {
            Some((
                ClipVision::load(&dir.join("image_encoder"), dtype, device)?,
                ImageProcessorConfig::load(&dir.join("image_processor/preprocessor_config.json"))?,
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

    /// Prompt embeddings (and negative ones when `guidance > 1`, the empty prompt when none is
    /// given) and CLIP penultimate states of `first` (and `last`) when there is an image branch.
    pub fn encode(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        guidance: f64,
        first: &RgbImage,
        last: Option<&RgbImage>,
    ) -> Result<Conditioning> {
        let max_len = text::MAX_SEQUENCE_LENGTH;
        let te = &self.text_encoder;
        let prompt_embeds = text::encode_prompt(&self.tokenizer, te, prompt, max_len)?;
        let negative_embeds = if guidance > 1.0 {
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
                let mut imgs = vec![first.clone()];
                if let Some(l) = last {
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
            guidance,
        })
    }
}

/// A loaded pipeline: the denoiser (DiT, VAE, scheduler config) and, until dropped, the encoders.
pub struct WanPipeline {
    pub dir: PathBuf,
    pub transformer: WanTransformer,
    pub vae: WanVae,
    encoders: Option<WanEncoders>,
    scheduler_config: PathBuf,
    device: Device,
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
    /// Loads every component of the diffusers folder `dir`: transformer and text/image encoders
    /// in `dtype`, the VAE in f32 (as the reference pipelines run it).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let encoders = WanEncoders::load(dir, dtype, device)?;
        let mut pipe = Self::load_denoiser(dir, dtype, device)?;
        pipe.encoders = Some(encoders);
        Ok(pipe)
    }

    /// Loads the transformer (in `dtype`), the VAE (f32) and the scheduler config, no encoders.
    pub fn load_denoiser(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let scheduler_config = dir.join("scheduler/scheduler_config.json");
        // Fail now, not after minutes of work, on a bad scheduler config.
        FlowUniPc::from_config(&scheduler_config, None)?;
        let transformer = WanTransformer::load(&dir.join("transformer"), dtype, device)?;
        let vae = WanVae::load(&dir.join("vae"), DType::F32, device)?;
        Ok(Self {
            dir: dir.to_owned(),
            transformer,
            vae,
            encoders: None,
            scheduler_config,
            device: device.clone(),
        })
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
        guidance: f64,
        first: &RgbImage,
        last: Option<&RgbImage>,
    ) -> Result<Conditioning> {
        let enc = self.encoders.as_ref().ok_or_else(|| {
            Error::msg("the text and image encoders are not loaded (or were dropped)")
        })?;
        if self.transformer.has_image_branch() && enc.image_encoder.is_none() {
            return Err(Error::msg(
                "the transformer has an image branch but no image encoder was loaded",
            ));
        }
        enc.encode(prompt, negative_prompt, guidance, first, last)
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
        let z = self.vae.config.z_dim;
        let shape = (1, z, (f - 1) / 4 + 1, h / 8, w / 8);
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

    /// The denoising loop; returns the final latents `[1, z, T', h, w]` f32 (normalised space).
    /// `on_step(done, total)` is called after each step.
    pub fn denoise(
        &self,
        req: &VideoRequest,
        cond: &Conditioning,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let tr = &self.transformer;
        let dtype = tr.dtype();
        let condition = self.condition(req)?;
        let mut latents = self.initial_latents(req)?;

        let mut sched = FlowUniPc::from_config(&self.scheduler_config, req.flow_shift)?;
        sched.set_timesteps(req.steps)?;
        let timesteps = sched.timesteps().to_vec();

        let do_cfg = cond.guidance > 1.0;
        let text_c = tr.embed_text(&cond.prompt_embeds)?;
        let text_u = if do_cfg {
            let n = cond
                .negative_embeds
                .as_ref()
                .ok_or_else(|| Error::msg("guidance > 1 needs negative prompt embeddings"))?;
            Some(tr.embed_text(n)?)
        } else {
            None
        };
        let img = match &cond.image_embeds {
            Some(i) => tr.embed_image(i)?,
            None => None,
        };
        let condition = condition.to_dtype(dtype)?;
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = Tensor::cat(&[&latents.to_dtype(dtype)?, &condition], 1)?;
            let ts = [t as f32];
            let mut noise = tr.forward_embedded(&input, &ts, &text_c, img.as_ref())?;
            if let Some(tu) = &text_u {
                let uncond = tr.forward_embedded(&input, &ts, tu, img.as_ref())?;
                noise = (&uncond + ((noise - &uncond)? * cond.guidance)?)?;
            }
            latents = sched.step(&noise, t, &latents)?;
            on_step(i + 1, total);
        }
        Ok(latents)
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
        let cond = self.encode_conditioning(
            prompt,
            negative_prompt,
            req.guidance,
            &req.first,
            req.last.as_ref(),
        )?;
        let latents = self.denoise(req, &cond, &mut |_, _| {})?;
        self.decode(&latents, &mut |_, _| {})
    }
}
