//! `tiny-ckpts DIR`: tiny random-weight checkpoints in the real layouts, so
//! the whole pipeline runs on any machine. The writers live in the model
//! crates; this module calls those that exist.

use std::path::Path;

use anyhow::{Context, Result};

/// Where the tiny VLM goes under the checkpoint root (the example job's `enhancePrompt.model`).
pub const TINY_VLM: &str = "tiny/qwen2.5-vl";
/// Where the tiny Wan model goes under the checkpoint root.
pub const TINY_WAN: &str = "tiny/wan2.1-flf2v";

/// What [`write_tiny_checkpoints`] did for each model.
#[derive(Debug, Default)]
pub struct TinyOutcome {
    pub written: Vec<String>,
    pub skipped: Vec<String>,
}

/// Writes the tiny checkpoints into `root`; a model folder that already holds
/// everything its loader reads is kept.
pub fn write_tiny_checkpoints(root: &Path) -> Result<TinyOutcome> {
    std::fs::create_dir_all(root.join("tiny"))
        .with_context(|| format!("cannot create {}", root.join("tiny").display()))?;
    let mut outcome = TinyOutcome::default();
    // Qwen2.5-VL: a tiny model in the released layout (seeded random weights).
    let vlm = root.join(TINY_VLM);
    if kubewan_qwen2_5_vl::checkpoint::require(&vlm).is_ok() {
        outcome.skipped.push(format!("{TINY_VLM}: already present"));
    } else {
        kubewan_qwen2_5_vl::write_tiny_checkpoint(&vlm, 0)
            .with_context(|| format!("cannot write the tiny Qwen2.5-VL to {}", vlm.display()))?;
        outcome.written.push(TINY_VLM.to_string());
    }
    // Wan2.1: a tiny FLF2V pipeline in the diffusers layout (fresh seeded random weights).
    let wan = root.join(TINY_WAN);
    if kubewan_wan::checkpoint::require(&wan).is_ok() {
        outcome.skipped.push(format!("{TINY_WAN}: already present"));
    } else {
        kubewan_wan::write_tiny_checkpoint(&wan, 0)
            .with_context(|| format!("cannot write the tiny Wan pipeline to {}", wan.display()))?;
        outcome.written.push(TINY_WAN.to_string());
    }
    Ok(outcome)
}
