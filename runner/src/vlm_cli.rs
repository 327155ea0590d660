//! `kubewan-runner vlm generate`: one Qwen2.5-VL generation from the command
//! line, for parity checks against transformers (DESIGN.md "Developer-facing
//! commands"). Prints `{"prompt_token_ids":[…],"token_ids":[…],"text":"…","top_logits":[[id,logit],…5]}`.
//!
//! OWNERSHIP: the Qwen2.5-VL engineer owns this file's final content.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

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
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: u32,
    /// Greedy decoding (argmax at every step).
    #[arg(long)]
    pub greedy: bool,
    /// Print the JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: VlmCommand) -> Result<()> {
    match command {
        VlmCommand::Generate(args) => {
            let _ = args;
            bail!("Qwen2.5-VL support is not built yet")
        }
    }
}
