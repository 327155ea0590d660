//! `kubewan-runner vlm generate`: one Qwen2.5-VL generation from the command
//! line, for parity checks against transformers (DESIGN.md "Developer-facing
//! commands"). Prints `{"prompt_token_ids":[…],"token_ids":[…],"text":"…","top_logits":[[id,logit],…5]}`.
//!
//! The images go into one user message in order, then the prompt, through the
//! model folder's chat template with the generation prompt; the image processor
//! is the folder's `preprocessor_config.json` (Pillow-exact bicubic resize).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::DType;
use clap::{Args, Subcommand};
use kubewan_crds::limits;
use kubewan_model_common::device::DeviceChoice;
use kubewan_qwen2_5_vl::checkpoint::PREPROCESSOR;
use kubewan_qwen2_5_vl::processor::smart_resize;
use kubewan_qwen2_5_vl::{GenerateRequest, PreprocessorConfig, Qwen25Vl, Sampling};

use crate::fsutil::read_image;

/// The environment variable `--device` of the developer commands defaults to.
pub const DEVICE_ENV: &str = "KUBEWAN_DEVICE";

#[derive(Subcommand, Debug)]
pub enum VlmCommand {
    /// Generate text for images and a prompt (greedy), matching transformers.
    Generate(VlmGenerateArgs),
}

#[derive(Args, Debug)]
pub struct VlmGenerateArgs {
    /// Model folder (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Input image (repeat for several).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// System message (default: the chat template's own, "You are a helpful assistant.").
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: u32,
    /// Greedy decoding (argmax at every step). Without it: sampling with --temperature/--top-p/--seed.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.8)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute dtype: f32 (parity), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// auto (CUDA when built with it and a GPU is visible), cpu, cuda or cuda:N.
    #[arg(long, env = DEVICE_ENV, default_value = "auto")]
    pub device: DeviceChoice,
    /// Print the JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype {other:?} (f32, bf16 or f16)"),
    })
}

/// Refuses a VLM request whose images, once the model folder's image
/// processor has resized them, hold more than
/// [`limits::MAX_VLM_IMAGE_PIXELS`] pixels in all: the vision tower attends
/// over every patch, so this is checked before anything is allocated.
pub fn check_image_budget(model_dir: &Path, images: &[image::DynamicImage]) -> Result<()> {
    let config = PreprocessorConfig::from_file(&PREPROCESSOR.path(model_dir))?;
    let factor = config.patch_size * config.merge_size;
    let mut pixels = 0u64;
    for img in images {
        let (h, w) = smart_resize(
            img.height() as usize,
            img.width() as usize,
            factor,
            config.min_pixels,
            config.max_pixels,
        )?;
        pixels += (h * w) as u64;
    }
    if pixels > limits::MAX_VLM_IMAGE_PIXELS {
        bail!(
            "the image processor of {} makes {pixels} pixels of these images, more than the \
             {} the VLM may see; use smaller images (or a smaller max_pixels)",
            model_dir.display(),
            limits::MAX_VLM_IMAGE_PIXELS
        );
    }
    Ok(())
}

fn check_args(args: &VlmGenerateArgs) -> Result<()> {
    let text = format!("{}{}", args.system.as_deref().unwrap_or(""), args.prompt);
    if let Err(why) = limits::check_text(&text, limits::MAX_VLM_PROMPT_BYTES) {
        bail!("--prompt (with --system) {why}");
    }
    if !(1..=limits::MAX_NEW_TOKENS).contains(&args.max_new_tokens) {
        bail!(
            "--max-new-tokens must be between 1 and {}, got {}",
            limits::MAX_NEW_TOKENS,
            args.max_new_tokens
        );
    }
    let temperature_ok = args.temperature.is_finite() && args.temperature > 0.0;
    let top_p_ok = args.top_p.is_finite() && args.top_p > 0.0 && args.top_p <= 1.0;
    if !(temperature_ok && top_p_ok) {
        bail!("--temperature must be positive and --top-p in (0, 1]");
    }
    Ok(())
}

pub fn run(command: VlmCommand) -> Result<()> {
    match command {
        VlmCommand::Generate(args) => {
            check_args(&args)?;
            let dtype = parse_dtype(&args.dtype)?;
            let device = args.device.resolve()?;
            let images = args
                .images
                .iter()
                .map(|p| read_image(p))
                .collect::<Result<Vec<_>>>()?;
            check_image_budget(&args.model, &images)?;
            let mut model = Qwen25Vl::load(&args.model, dtype, &device)
                .with_context(|| format!("cannot load Qwen2.5-VL from {}", args.model.display()))?;
            let request = GenerateRequest {
                system: args.system.clone(),
                images,
                prompt: args.prompt.clone(),
                max_new_tokens: args.max_new_tokens as usize,
                sampling: if args.greedy {
                    Sampling::Greedy
                } else {
                    Sampling::Sample {
                        temperature: args.temperature,
                        top_p: args.top_p,
                        seed: args.seed,
                    }
                },
            };
            let out = model.generate(&request)?;
            if args.json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("{}", out.text);
            }
            Ok(())
        }
    }
}
