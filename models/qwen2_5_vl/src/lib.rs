//! Qwen2.5-VL on candle: vision tower, M-RoPE decoder, image processor, chat
//! template and tokenizer, loaded from a Hugging Face model folder (the
//! released layout or the one transformers 5 writes), with parity against
//! transformers checked on tiny random-weight checkpoints (`tests/parity.rs`).

#![recursion_limit = "256"]

pub mod chat;
pub mod checkpoint;
pub mod config;
mod error;
pub mod nn;
pub mod processor;
pub mod text;
pub mod tiny;

pub mod vision;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

pub use config::{Config, TextConfig, VisionConfig};
pub use error::Error;
pub use processor::PreprocessorConfig;
pub use tiny::{CheckpointSpec, write_checkpoint, write_tiny_checkpoint};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    Sample {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub system: Option<String>,
    pub images: Vec<image::DynamicImage>,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerateOutput {
    /// Everything fed to the model (chat template, image pads expanded).
    pub prompt_token_ids: Vec<u32>,
    /// Generated tokens only (the stop token included when one was generated, like transformers).
    pub token_ids: Vec<u32>,
    /// `token_ids` decoded without special tokens.
    pub text: String,
    /// The 5 highest (token, logit) at the first generated position.
    pub top_logits: Vec<(u32, f32)>,
}

/// The prompt after templating and tokenising, with the processed images.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub images: Vec<processor::ProcessedImage>,
}

pub struct Qwen25Vl {
    config: Config,
    preprocessor: PreprocessorConfig,
    tokenizer: tokenizers::Tokenizer,
    template: String,
    vision: vision::VisionTower,
    text: text::TextModel,
    device: Device,
    dir: PathBuf,
}

impl std::fmt::Debug for Qwen25Vl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen25Vl")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Qwen25Vl {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, Error> {
        checkpoint::require(dir)?;
        let config = Config::from_dir(dir)?;
        let preprocessor_path = checkpoint::PREPROCESSOR.path(dir);
        let preprocessor = PreprocessorConfig::from_file(&preprocessor_path)?;
        if preprocessor.patch_size != config.vision.patch_size
            || preprocessor.merge_size != config.vision.spatial_merge_size
            || preprocessor.temporal_patch_size != config.vision.temporal_patch_size
        {
            return Err(Error::config(
                &preprocessor_path,
                "patch/merge/temporal sizes differ from config.json's vision_config",
            ));
        }
        let tok_path = checkpoint::TOKENIZER.path(dir);
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                msg: e.to_string(),
            })?;
        let (_, template) = chat::load_template(dir)?;
        let mut config = config;
        if config.eos_token_ids.is_empty()
            && let Some(id) = tokenizer.token_to_id("<|im_end|>")
        {
            config.eos_token_ids.push(id);
        }

        let vb = checkpoint::WEIGHTS.var_builder(dir, dtype, device)?;
        let (text_prefix, vision_prefix) =
            if vb.contains_tensor("model.language_model.embed_tokens.weight") {
                ("model.language_model", "model.visual")
            } else {
                ("model", "visual")
            };
        let wrap = |what: &str, e: candle_core::Error| {
            Error::Invalid(format!("{}: loading the {what}: {e}", dir.display()))
        };
        let vision = vision::VisionTower::new(&config.vision, vb.pp(vision_prefix))
            .map_err(|e| wrap("vision tower", e))?;
        let text = text::TextModel::new(
            &config.text,
            config.tie_word_embeddings,
            vb.pp(text_prefix),
            vb.clone(),
        )
        .map_err(|e| wrap("text decoder", e))?;
        drop(vb);
        Ok(Self {
            config,
            preprocessor,
            tokenizer,
            template,
            vision,
            text,
            device: device.clone(),
            dir: dir.to_owned(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Chat template + image processor + tokenizer, exactly what `generate` feeds the model.
    pub fn prepare(&self, request: &GenerateRequest) -> Result<PreparedPrompt, Error> {
        let text = chat::render(
            &self.template,
            request.system.as_deref(),
            request.images.len(),
            &request.prompt,
        )?;
        let images = request
            .images
            .iter()
            .map(|im| processor::process_image(&self.preprocessor, im))
            .collect::<Result<Vec<_>, _>>()?;
        let pad = self
            .tokenizer
            .id_to_token(self.config.image_token_id)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "image_token_id {} is not in the tokenizer",
                    self.config.image_token_id
                ))
            })?;
        // expand each image's placeholder to one pad per merged patch
        let mut expanded = String::with_capacity(text.len());
        let mut rest = text.as_str();
        let mut used = 0;
        while let Some(i) = rest.find(pad.as_str()) {
            let img = images.get(used).ok_or_else(|| {
                Error::Template(format!(
                    "the chat template produced more {pad} than the {} images",
                    images.len()
                ))
            })?;
            expanded.push_str(&rest[..i]);
            expanded.push_str(&pad.repeat(img.num_tokens(self.preprocessor.merge_size)));
            rest = &rest[i + pad.len()..];
            used += 1;
        }
        expanded.push_str(rest);
        if used != images.len() {
            return Err(Error::Template(format!(
                "the chat template placed {used} image(s) for {} given",
                images.len()
            )));
        }
        let enc = self
            .tokenizer
            .encode(expanded.as_str(), false)
            .map_err(|e| Error::Tokenizer {
                path: checkpoint::TOKENIZER.path(&self.dir),
                msg: e.to_string(),
            })?;
        Ok(PreparedPrompt {
            text,
            token_ids: enc.get_ids().to_vec(),
            images,
        })
    }

    /// 3-D (temporal, height, width) position ids as transformers' `get_rope_index`,
    /// and the delta that continues them during decoding.
    pub fn rope_index(
        &self,
        ids: &[u32],
        grids: &[(usize, usize, usize)],
    ) -> Result<([Vec<i64>; 3], i64), Error> {
        let m = self.config.vision.spatial_merge_size;
        let mut pos: [Vec<i64>; 3] = Default::default();
        let mut cur: i64 = 0;
        let mut grid_iter = grids.iter();
        let mut i = 0;
        while i < ids.len() {
            if ids[i] == self.config.image_token_id {
                let &(t, h, w) = grid_iter
                    .next()
                    .ok_or_else(|| Error::Invalid("more image token groups than images".into()))?;
                let (lt, lh, lw) = (t, h / m, w / m);
                let n = lt * lh * lw;
                if i + n > ids.len()
                    || ids[i..i + n]
                        .iter()
                        .any(|&x| x != self.config.image_token_id)
                {
                    return Err(Error::Invalid(format!(
                        "image placeholder run at {i} does not hold {n} image tokens"
                    )));
                }
                for ti in 0..lt {
                    for hi in 0..lh {
                        for wi in 0..lw {
                            pos[0].push(cur + ti as i64);
                            pos[1].push(cur + hi as i64);
                            pos[2].push(cur + wi as i64);
                        }
                    }
                }
                cur += lh.max(lw) as i64;
                i += n;
            } else {
                for a in &mut pos {
                    a.push(cur);
                }
                cur += 1;
                i += 1;
            }
        }
        if grid_iter.next().is_some() {
            return Err(Error::Invalid(
                "fewer image token groups than images".into(),
            ));
        }
        let max = pos
            .iter()
            .flat_map(|a| a.iter())
            .copied()
            .max()
            .unwrap_or(-1);
        let delta = max + 1 - ids.len() as i64;
        Ok((pos, delta))
    }

    /// Input embeddings with every image's features in place of its pad tokens.
    fn embed_prompt(&self, prepared: &PreparedPrompt) -> Result<Tensor, Error> {
        let ids = &prepared.token_ids;
        let embeds = self.text.embed(ids)?;
        if prepared.images.is_empty() {
            return Ok(embeds);
        }
        let plen = self.vision.patch_len();
        let mut flat = Vec::new();
        for im in &prepared.images {
            flat.extend_from_slice(&im.patches);
        }
        let n = flat.len() / plen;
        let pixels = Tensor::from_vec(flat, (n, plen), &self.device)?;
        let grids: Vec<_> = prepared.images.iter().map(|im| im.grid).collect();
        let feats = self
            .vision
            .forward(&pixels, &grids)?
            .to_dtype(embeds.dtype())?;
        let n_img = ids
            .iter()
            .filter(|&&t| t == self.config.image_token_id)
            .count();
        if n_img != feats.dim(0)? {
            return Err(Error::Invalid(format!(
                "image features and image tokens do not match: tokens {n_img}, features {}",
                feats.dim(0)?
            )));
        }
        let mut pieces = Vec::new();
        let mut i = 0;
        let mut f = 0;
        while i < ids.len() {
            let is_img = ids[i] == self.config.image_token_id;
            let mut j = i;
            while j < ids.len() && (ids[j] == self.config.image_token_id) == is_img {
                j += 1;
            }
            if is_img {
                pieces.push(feats.narrow(0, f, j - i)?);
                f += j - i;
            } else {
                pieces.push(embeds.narrow(0, i, j - i)?);
            }
            i = j;
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    pub fn generate(&mut self, request: &GenerateRequest) -> Result<GenerateOutput, Error> {
        self.generate_streaming(request, |_| {})
    }

    /// [`Self::generate`], handing each token to `on_token` as soon as it is chosen
    /// (as transformers' streamers get them): a caller can show the text as it comes,
    /// or time the prefill (until the first token) apart from the decoding steps.
    pub fn generate_streaming(
        &mut self,
        request: &GenerateRequest,
        on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput, Error> {
        let prepared = self.prepare(request)?;
        let grids: Vec<_> = prepared.images.iter().map(|im| im.grid).collect();
        let (pos, delta) = self.rope_index(&prepared.token_ids, &grids)?;
        let embeds = self.embed_prompt(&prepared)?;
        self.text.clear_cache();
        let result = self.decode_loop(&prepared, embeds, pos, delta, request, on_token);
        self.text.clear_cache();
        result
    }

    fn decode_loop(
        &mut self,
        prepared: &PreparedPrompt,
        embeds: Tensor,
        pos: [Vec<i64>; 3],
        delta: i64,
        request: &GenerateRequest,
        mut on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput, Error> {
        let mut rng = match request.sampling {
            Sampling::Sample { seed, .. } => Some(rand::rngs::StdRng::seed_from_u64(seed)),
            Sampling::Greedy => None,
        };
        let mut logits = self.text.forward(&embeds, &pos)?.to_vec1::<f32>()?;
        let top_logits = top_k(&logits, 5);
        let mut out = Vec::new();
        for step in 0..request.max_new_tokens {
            let next = match (request.sampling, rng.as_mut()) {
                (
                    Sampling::Sample {
                        temperature, top_p, ..
                    },
                    Some(rng),
                ) if temperature > 0.0 => sample(&logits, temperature, top_p, rng),
                _ => argmax(&logits),
            };
            out.push(next);
            on_token(next);
            if self.config.eos_token_ids.contains(&next) || step + 1 == request.max_new_tokens {
                break;
            }
            // position of the token just generated: after the prompt and earlier outputs
            let p = (prepared.token_ids.len() + step) as i64 + delta;
            let e = self.text.embed(&[next])?;
            logits = self
                .text
                .forward(&e, &[vec![p], vec![p], vec![p]])?
                .to_vec1::<f32>()?;
        }
        let text = self
            .tokenizer
            .decode(&out, true)
            .map_err(|e| Error::Tokenizer {
                path: checkpoint::TOKENIZER.path(&self.dir),
                msg: e.to_string(),
            })?;
        Ok(GenerateOutput {
            prompt_token_ids: prepared.token_ids.clone(),
            token_ids: out,
            text,
            top_logits,
        })
    }

    /// f32 logits at the first generated position (for parity checks).
    pub fn first_logits(&mut self, request: &GenerateRequest) -> Result<Vec<f32>, Error> {
        let prepared = self.prepare(request)?;
        let grids: Vec<_> = prepared.images.iter().map(|im| im.grid).collect();
        let (pos, _) = self.rope_index(&prepared.token_ids, &grids)?;
        let embeds = self.embed_prompt(&prepared)?;
        self.text.clear_cache();
        let logits = self.text.forward(&embeds, &pos)?.to_vec1::<f32>();
        self.text.clear_cache();
        Ok(logits?)
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn top_k(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i as u32, v[i])).collect()
}

/// Temperature + nucleus (top-p) sampling.
fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_p = if top_p > 0.0 && top_p < 1.0 {
        top_p
    } else {
        1.0
    };
    let mut keep = 0;
    let mut cum = 0.0;
    for p in &probs {
        keep += 1;
        cum += p.1;
        if cum >= top_p {
            break;
        }
    }
    probs.truncate(keep.max(1));
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * mass;
    for p in &probs {
        r -= p.1;
        if r <= 0.0 {
            return p.0 as u32;
        }
    }
    probs.last().map(|p| p.0 as u32).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let logits = vec![0.0f32, 5.0, 4.9, -3.0];
        let mut a = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = rand::rngs::StdRng::seed_from_u64(7);
        let xs: Vec<u32> = (0..50).map(|_| sample(&logits, 1.0, 0.9, &mut a)).collect();
        let ys: Vec<u32> = (0..50).map(|_| sample(&logits, 1.0, 0.9, &mut b)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x == 1 || x == 2), "{xs:?}");
        assert!(xs.contains(&1) && xs.contains(&2));
        // tiny top_p keeps only the best token
        assert!((0..20).all(|_| sample(&logits, 1.0, 0.01, &mut a) == 1));
    }

    #[test]
    fn top_k_sorted() {
        assert_eq!(top_k(&[1.0, 3.0, 2.0], 2), vec![(1, 3.0), (2, 2.0)]);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
