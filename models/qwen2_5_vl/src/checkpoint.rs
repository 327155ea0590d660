//! The Qwen2.5-VL checkpoint catalogue: every file the loader reads from a
//! Hugging Face model folder, and why. [`crate::Qwen25Vl::load`] checks it
//! before reading anything and reads each file through its entry here; the
//! runner's `check-ckpts` checks folders against [`REQUIRED`], each file
//! read by the same parser its loader uses.

use std::path::Path;

use kubewan_model_common::LoadError;
use kubewan_model_common::checkpoint::{
    Inventory, Required, RequiredFile, RequiredWeights, check_tokenizer,
};
use serde_json::Value;

use crate::config::Config;
use crate::processor::PreprocessorConfig;

pub const CONFIG: RequiredFile = RequiredFile {
    component: "",
    names: &["config.json"],
    why: "the decoder's and the vision tower's dimensions and the special token ids",
    check: check_config,
};

pub const TOKENIZER: RequiredFile = RequiredFile {
    component: "",
    names: &["tokenizer.json"],
    why: "the tokenizer the chat template's text is encoded with and the answer decoded with",
    check: check_tokenizer,
};

pub const PREPROCESSOR: RequiredFile = RequiredFile {
    component: "",
    names: &["preprocessor_config.json"],
    why: "the image processor: pixel limits, patch and merge sizes, normalisation",
    check: check_preprocessor,
};

/// transformers 5 writes `chat_template.jinja`, 4.4x `chat_template.json`,
/// older releases keep the template in `tokenizer_config.json`; the loader
/// reads the first that holds one, in this order.
pub const CHAT_TEMPLATE: RequiredFile = RequiredFile {
    component: "",
    names: &[
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer_config.json",
    ],
    why: "the chat template that places the system prompt, the images and the prompt",
    check: check_chat_template,
};

pub const WEIGHTS: RequiredWeights = RequiredWeights {
    component: "",
    stem: "model",
    why: "the vision tower's and the decoder's weights",
};

/// Read when present, not required: the stop tokens (`eos_token_id`) when
/// they differ from `config.json`'s.
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// Everything a Qwen2.5-VL folder must hold.
pub const REQUIRED: &[Required] = &[
    Required::File(CONFIG),
    Required::File(TOKENIZER),
    Required::File(PREPROCESSOR),
    Required::File(CHAT_TEMPLATE),
    Required::Weights(WEIGHTS),
];

/// Checks the model folder `dir` against [`REQUIRED`]: one error naming
/// every missing file.
pub fn require(dir: &Path) -> Result<Inventory, LoadError> {
    kubewan_model_common::checkpoint::require(dir, REQUIRED)
}

/// `config.json` read into [`Config`], as the loader reads it.
fn check_config(path: &Path) -> Result<(), String> {
    let value: Value =
        kubewan_model_common::read_json(path, "a Qwen2.5-VL config").map_err(|e| e.to_string())?;
    Config::from_value(path, &value)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn check_preprocessor(path: &Path) -> Result<(), String> {
    PreprocessorConfig::from_file(path)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The chat template found as the loader finds it, and rendered once.
fn check_chat_template(path: &Path) -> Result<(), String> {
    let dir = path.parent().unwrap_or(path);
    let (found, template) = crate::chat::load_template(dir).map_err(|e| e.to_string())?;
    crate::chat::render(&template, Some("system"), 1, "prompt")
        .map(drop)
        .map_err(|e| {
            format!(
                "{}: the chat template does not render: {e}",
                found.display()
            )
        })
}
