//! The Wan checkpoint catalogue: every file the loaders read from a diffusers
//! `WanImageToVideoPipeline` folder, and why. The component loaders read their
//! files through the entries here (relative to their component folder),
//! [`crate::pipeline`] checks the whole catalogue before loading, and the
//! runner's `check-ckpts` checks folders against [`required`], each file read
//! by the same parser its loader uses.
//!
//! Two layouts: Wan2.1 (one `transformer`, a CLIP `image_encoder` when the
//! transformer has an image branch) and Wan2.2 I2V-A14B (`transformer` for the
//! high-noise steps and `transformer_2` for the low-noise ones, switched at
//! `boundary_ratio` of `model_index.json`, no image encoder). [`ModelIndex`]
//! tells them apart.

use std::path::Path;

use kubewan_model_common::LoadError;
use kubewan_model_common::checkpoint::{
    Inventory, Required, RequiredFile, RequiredWeights, check_tokenizer,
};
use serde::Deserialize;

use crate::clip::{ClipVisionConfig, ImageProcessorConfig};
use crate::scheduler::FlowUniPc;
use crate::transformer::WanTransformerConfig;
use crate::umt5::Umt5Config;
use crate::vae::WanVaeConfig;

/// The diffusers component folders the pipeline loads.
pub const TRANSFORMER: &str = "transformer";
pub const TRANSFORMER_2: &str = "transformer_2";
pub const VAE: &str = "vae";
pub const TEXT_ENCODER: &str = "text_encoder";
pub const TOKENIZER_DIR: &str = "tokenizer";
pub const IMAGE_ENCODER: &str = "image_encoder";
pub const IMAGE_PROCESSOR_DIR: &str = "image_processor";
pub const SCHEDULER_DIR: &str = "scheduler";

pub const MODEL_INDEX: RequiredFile = RequiredFile {
    component: "",
    names: &["model_index.json"],
    why: "the diffusers pipeline index that makes the folder a Wan pipeline",
    check: check_model_index,
};

pub const TRANSFORMER_CONFIG: RequiredFile = RequiredFile {
    component: TRANSFORMER,
    names: &["config.json"],
    why: "the DiT's dimensions, and whether it has an image branch (image_dim)",
    check: check_transformer_config,
};

pub const TRANSFORMER_WEIGHTS: RequiredWeights = RequiredWeights {
    component: TRANSFORMER,
    stem: "diffusion_pytorch_model",
    why: "the DiT's weights",
};

pub const TRANSFORMER_2_CONFIG: RequiredFile = RequiredFile {
    component: TRANSFORMER_2,
    names: &["config.json"],
    why: "the low-noise expert's dimensions (Wan2.2 two-expert models)",
    check: check_transformer_config,
};

pub const TRANSFORMER_2_WEIGHTS: RequiredWeights = RequiredWeights {
    component: TRANSFORMER_2,
    stem: "diffusion_pytorch_model",
    why: "the low-noise expert's weights (Wan2.2 two-expert models)",
};

pub const VAE_CONFIG: RequiredFile = RequiredFile {
    component: VAE,
    names: &["config.json"],
    why: "the VAE's dimensions and latent statistics",
    check: check_vae_config,
};

pub const VAE_WEIGHTS: RequiredWeights = RequiredWeights {
    component: VAE,
    stem: "diffusion_pytorch_model",
    why: "the VAE's weights",
};

pub const TEXT_ENCODER_CONFIG: RequiredFile = RequiredFile {
    component: TEXT_ENCODER,
    names: &["config.json"],
    why: "the UMT5 text encoder's dimensions",
    check: check_text_encoder_config,
};

pub const TEXT_ENCODER_WEIGHTS: RequiredWeights = RequiredWeights {
    component: TEXT_ENCODER,
    stem: "model",
    why: "the UMT5 text encoder's weights",
};

/// The fast-tokenizer file: the tokenizers crate cannot read `spiece.model`.
pub const TOKENIZER: RequiredFile = RequiredFile {
    component: TOKENIZER_DIR,
    names: &["tokenizer.json"],
    why: "the UMT5 tokenizer the prompts are encoded with",
    check: check_tokenizer,
};

pub const SCHEDULER: RequiredFile = RequiredFile {
    component: SCHEDULER_DIR,
    names: &["scheduler_config.json"],
    why: "the UniPC scheduler's settings (flow_shift, solver order)",
    check: check_scheduler,
};

pub const IMAGE_ENCODER_CONFIG: RequiredFile = RequiredFile {
    component: IMAGE_ENCODER,
    names: &["config.json"],
    why: "the CLIP vision encoder's dimensions",
    check: check_image_encoder_config,
};

pub const IMAGE_ENCODER_WEIGHTS: RequiredWeights = RequiredWeights {
    component: IMAGE_ENCODER,
    stem: "model",
    why: "the CLIP vision encoder's weights",
};

pub const IMAGE_PROCESSOR: RequiredFile = RequiredFile {
    component: IMAGE_PROCESSOR_DIR,
    names: &["preprocessor_config.json"],
    why: "the CLIP image processor: resize, crop, normalisation",
    check: check_image_processor,
};

/// What every Wan pipeline folder holds.
pub const REQUIRED: &[Required] = &[
    Required::File(MODEL_INDEX),
    Required::File(TRANSFORMER_CONFIG),
    Required::Weights(TRANSFORMER_WEIGHTS),
    Required::File(VAE_CONFIG),
    Required::Weights(VAE_WEIGHTS),
    Required::File(TEXT_ENCODER_CONFIG),
    Required::Weights(TEXT_ENCODER_WEIGHTS),
    Required::File(TOKENIZER),
    Required::File(SCHEDULER),
];

/// What a pipeline whose transformer has an image branch also holds: the
/// CLIP encoder of the first (and last) frame.
pub const IMAGE_BRANCH: &[Required] = &[
    Required::File(IMAGE_ENCODER_CONFIG),
    Required::Weights(IMAGE_ENCODER_WEIGHTS),
    Required::File(IMAGE_PROCESSOR),
];

/// What a two-expert (Wan2.2) pipeline also holds: the low-noise expert.
pub const LOW_NOISE_EXPERT: &[Required] = &[
    Required::File(TRANSFORMER_2_CONFIG),
    Required::Weights(TRANSFORMER_2_WEIGHTS),
];

/// One of the denoising transformers of a pipeline. Wan2.1 has one (`transformer`, counted as
/// [`Expert::High`]: it runs every step); Wan2.2 I2V-A14B has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Expert {
    /// `transformer`: the steps whose timestep is at or above the boundary.
    High,
    /// `transformer_2`: the steps below the boundary.
    Low,
}

impl Expert {
    /// Its weights.
    pub fn weights(self) -> RequiredWeights {
        match self {
            Expert::High => TRANSFORMER_WEIGHTS,
            Expert::Low => TRANSFORMER_2_WEIGHTS,
        }
    }

    /// Its component folder.
    pub fn component(self) -> &'static str {
        match self {
            Expert::High => TRANSFORMER,
            Expert::Low => TRANSFORMER_2,
        }
    }

    /// `high` / `low`, as phase names and reports say it.
    pub fn name(self) -> &'static str {
        match self {
            Expert::High => "high",
            Expert::Low => "low",
        }
    }
}

/// The fields of `model_index.json` that shape the pipeline.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelIndex {
    /// Wan2.2: `transformer` runs timesteps ≥ `boundary_ratio · num_train_timesteps`,
    /// `transformer_2` the others.
    #[serde(default)]
    pub boundary_ratio: Option<f64>,
    /// Wan2.2 TI2V-5B's per-token timesteps (not supported).
    #[serde(default)]
    pub expand_timesteps: bool,
    /// `[library, class]`, `[null, null]` or absent.
    #[serde(default)]
    transformer_2: Option<serde_json::Value>,
}

impl ModelIndex {
    /// Reads and checks `model_index.json` of the pipeline folder `dir`.
    pub fn read(dir: &Path) -> crate::Result<Self> {
        let path = MODEL_INDEX.path(dir);
        let index: ModelIndex =
            kubewan_model_common::read_json(&path, "a diffusers pipeline index")?;
        let refuse = |what: String| Err(crate::Error::msg(format!("{}: {what}", path.display())));
        if index.expand_timesteps {
            return refuse(
                "expand_timesteps is true (Wan2.2 TI2V-5B's per-token timesteps), which is not supported"
                    .into(),
            );
        }
        if let Some(ratio) = index.boundary_ratio {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return refuse(format!("boundary_ratio {ratio} is not in (0, 1]"));
            }
            if !index.lists_transformer_2() {
                return refuse(format!(
                    "boundary_ratio {ratio} switches to transformer_2, which the index does not list"
                ));
            }
        }
        Ok(index)
    }

    fn lists_transformer_2(&self) -> bool {
        matches!(&self.transformer_2, Some(serde_json::Value::Array(a)) if a.iter().any(|v| !v.is_null()))
    }

    /// The experts the pipeline runs: `transformer`, and `transformer_2` when there is a boundary.
    pub fn experts(&self) -> Vec<Expert> {
        match self.boundary_ratio {
            Some(_) => vec![Expert::High, Expert::Low],
            None => vec![Expert::High],
        }
    }
}

/// Whether the transformer of the pipeline folder `dir` has an image branch
/// (its config has `image_dim`), which decides if the CLIP encoder is loaded.
pub fn has_image_branch(dir: &Path) -> Result<bool, LoadError> {
    let config: WanTransformerConfig = kubewan_model_common::read_json(
        &TRANSFORMER_CONFIG.path(&dir.join(TRANSFORMER)),
        "a Wan transformer config",
    )?;
    Ok(config.image_dim.is_some())
}

/// Every file the loaders read from the pipeline folder `dir`: [`REQUIRED`],
/// [`IMAGE_BRANCH`] unless the transformer config says there is no image
/// branch (an unreadable config counts as one, so nothing goes unlisted), and
/// [`LOW_NOISE_EXPERT`] when `model_index.json` has a boundary.
pub fn required(dir: &Path) -> Vec<Required> {
    let mut required = REQUIRED.to_vec();
    if has_image_branch(dir).unwrap_or(true) {
        required.extend_from_slice(IMAGE_BRANCH);
    }
    if ModelIndex::read(dir).is_ok_and(|index| index.experts().contains(&Expert::Low)) {
        required.extend_from_slice(LOW_NOISE_EXPERT);
    }
    required
}

/// Checks the pipeline folder `dir` against [`required`]: one error naming
/// every missing file.
pub fn require(dir: &Path) -> Result<Inventory, LoadError> {
    kubewan_model_common::checkpoint::require(dir, &required(dir))
}

/// The components a pipeline index must name: those [`required`] reads.
fn components(dir: &Path) -> Vec<&'static str> {
    let mut names = vec![TRANSFORMER, VAE, TEXT_ENCODER, TOKENIZER_DIR, SCHEDULER_DIR];
    if has_image_branch(dir).unwrap_or(true) {
        names.extend([IMAGE_ENCODER, IMAGE_PROCESSOR_DIR]);
    }
    if ModelIndex::read(dir).is_ok_and(|index| index.experts().contains(&Expert::Low)) {
        names.push(TRANSFORMER_2);
    }
    names
}

/// `model_index.json`: a Wan pipeline naming, as `[library, class]`, every
/// component the loaders read, with experts the pipeline can run
/// ([`ModelIndex::read`]).
fn check_model_index(path: &Path) -> Result<(), String> {
    let dir = path.parent().unwrap_or(path);
    ModelIndex::read(dir).map_err(|e| e.to_string())?;
    let index: serde_json::Map<String, serde_json::Value> =
        kubewan_model_common::read_json(path, "a diffusers pipeline index")
            .map_err(|e| e.to_string())?;
    let class = index
        .get("_class_name")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    if !class.starts_with("Wan") {
        return Err(format!(
            "{}: _class_name is {class:?}, not a Wan pipeline",
            path.display()
        ));
    }
    let wrong: Vec<&str> = components(dir)
        .into_iter()
        .filter(|name| {
            !index
                .get(*name)
                .and_then(|v| v.as_array())
                .is_some_and(|pair| pair.len() == 2 && pair.iter().all(|part| part.is_string()))
        })
        .collect();
    if !wrong.is_empty() {
        return Err(format!(
            "{}: does not name the component(s) {} as [library, class]",
            path.display(),
            wrong.join(", ")
        ));
    }
    Ok(())
}

fn parses_as<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<(), String> {
    kubewan_model_common::read_json::<T>(path, what)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn check_transformer_config(path: &Path) -> Result<(), String> {
    parses_as::<WanTransformerConfig>(path, "a Wan transformer config")
}

fn check_vae_config(path: &Path) -> Result<(), String> {
    parses_as::<WanVaeConfig>(path, "a Wan VAE config")
}

fn check_text_encoder_config(path: &Path) -> Result<(), String> {
    parses_as::<Umt5Config>(path, "a UMT5 config")
}

fn check_scheduler(path: &Path) -> Result<(), String> {
    FlowUniPc::from_config(path, None)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn check_image_encoder_config(path: &Path) -> Result<(), String> {
    ClipVisionConfig::load(path)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn check_image_processor(path: &Path) -> Result<(), String> {
    ImageProcessorConfig::load(path)
        .map(drop)
        .map_err(|e| e.to_string())
}
