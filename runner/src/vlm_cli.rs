//! `kubewan-runner vlm generate`: one Qwen2.5-VL generation from the command
//! line, for parity checks against transformers (DESIGN.md "Developer-facing
//! commands"). Prints `{"prompt_token_ids":[…],"token_ids":[…],"text":"…","top_logits":[[id,logit],…5]}`.
//!
//! The images go into one user message in order, then the prompt, through the
//! model folder's chat template with the generation prompt; the image processor
//! is the folder's `preprocessor_config.json` (Pillow-exact bicubic resize).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::DType;
use clap::{Args, Subcommand};
use kubewan_qwen2_5_vl::{GenerateRequest, Qwen25Vl, Sampling};

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

pub fn run(command: VlmCommand) -> Result<()> {
    match command {
        VlmCommand::Generate(args) => {
            let dtype = parse_dtype(&args.dtype)?;
            let device = crate::video_cli::device();
            let images = args
                .images
                .iter()
                .map(|p| {
                    image::open(p).with_context(|| format!("cannot read image {}", p.display()))
                })
                .collect::<Result<Vec<_>>>()?;
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
