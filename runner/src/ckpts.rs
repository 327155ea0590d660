//! Offline checkpoint resolution. One root (canonicalised); every model
//! reference is relative to it and must stay inside it, symlinks included.
//! A folder is checked against its model crate's catalogue (the files its
//! loader reads, weight shards resolved through their indexes, weight
//! headers validated): a missing, unreadable or malformed file gives ONE
//! error naming the model, the root, the resolved folder and every file that
//! was looked for and not found. Nothing is ever downloaded.

use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use kubewan_model_common::checkpoint::{Required, inventory};
use kubewan_model_common::read_json;
use kubewan_model_common::safetensors::read_header;
use serde_json::Value;

/// Default checkpoint root inside a pod.
pub const CKPTS_DEFAULT: &str = kubewan_crds::task::CKPTS_MOUNT;
/// Environment variable naming the checkpoint root.
pub const CKPTS_ENV: &str = "KUBEWAN_CKPTS";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Qwen2.5-VL in the Hugging Face layout (config.json `model_type: qwen2_5_vl`).
    Qwen2_5Vl,
    /// Wan2.1 in the diffusers layout (model_index.json `_class_name: Wan…Pipeline`).
    Wan,
}

impl ModelKind {
    /// What a folder of this kind must hold: its model crate's catalogue.
    fn required(self, dir: &Path) -> Vec<Required> {
        match self {
            ModelKind::Qwen2_5Vl => kubewan_qwen2_5_vl::checkpoint::REQUIRED.to_vec(),
            ModelKind::Wan => kubewan_wan::checkpoint::required(dir),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Qwen2_5Vl => "qwen2_5_vl (Hugging Face layout)",
            ModelKind::Wan => "wan (diffusers layout)",
        })
    }
}

/// A canonical checkpoint root.
#[derive(Clone, Debug)]
pub struct CkptRoot {
    root: PathBuf,
}

/// A model folder that passed its checks.
#[derive(Clone, Debug)]
pub struct ResolvedModel {
    pub reference: String,
    pub dir: PathBuf,
    pub kind: ModelKind,
    /// Every required file that was found.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data in the weight files.
    pub weight_bytes: u64,
}

impl CkptRoot {
    /// Resolves `root` to an absolute, canonical folder.
    pub fn open(root: &Path) -> Result<CkptRoot> {
        let canonical = fs::canonicalize(root).with_context(|| {
            format!(
                "checkpoint root {} does not exist or cannot be read (set --ckpts or {CKPTS_ENV})",
                root.display()
            )
        })?;
        if !canonical.is_dir() {
            bail!("checkpoint root {} is not a folder", canonical.display());
        }
        Ok(CkptRoot { root: canonical })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The folder of `reference`, which must be relative and stay inside the
    /// root after following symlinks.
    pub fn resolve(&self, reference: &str) -> Result<PathBuf> {
        let path = self.resolve_path("model", reference)?;
        if !path.is_dir() {
            bail!(
                "model {reference:?}: {} is not a folder (checkpoint root {})",
                path.display(),
                self.root.display()
            );
        }
        Ok(path)
    }

    /// The LoRA file `reference` (relative, inside the root like a model
    /// folder), checked to be a readable safetensors file.
    pub fn check_lora(&self, reference: &str) -> Result<PathBuf> {
        let path = self.resolve_path("LoRA", reference)?;
        if !path.is_file() {
            bail!(
                "LoRA {reference:?}: {} is not a file (checkpoint root {})",
                path.display(),
                self.root.display()
            );
        }
        read_header(&path).with_context(|| format!("LoRA {reference:?}"))?;
        Ok(path)
    }

    /// `reference` (a `what`: model, LoRA) under the root: relative, no `..`,
    /// existing, and inside the root once symlinks are followed.
    fn resolve_path(&self, what: &str, reference: &str) -> Result<PathBuf> {
        let refused = |why: &str| {
            anyhow::anyhow!(
                "{what} {reference:?} {why}: {what} references are relative to the checkpoint root {} and must stay inside it",
                self.root.display()
            )
        };
        if reference.trim().is_empty() {
            return Err(refused("is empty"));
        }
        let path = Path::new(reference);
        if path.is_absolute() {
            return Err(refused("is an absolute path"));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(refused("escapes the root with '..'"));
        }
        let joined = self.root.join(path);
        let canonical = match fs::canonicalize(&joined) {
            Ok(c) => c,
            Err(_) => {
                bail!(
                    "{what} {reference:?} not found: {} does not exist under the checkpoint root {} \
                     (nothing is downloaded; put it there)",
                    joined.display(),
                    self.root.display()
                )
            }
        };
        if !canonical.starts_with(&self.root) {
            return Err(refused(&format!(
                "resolves through a symlink to {}, outside the root",
                canonical.display()
            )));
        }
        Ok(canonical)
    }

    /// Resolves `reference`, detects its kind, checks it is `expected` (when
    /// given) and that every file the kind needs is present and readable.
    pub fn check(&self, reference: &str, expected: Option<ModelKind>) -> Result<ResolvedModel> {
        let dir = self.resolve(reference)?;
        let kind = detect_kind(&dir).with_context(|| {
            format!(
                "model {reference:?} (folder {}, checkpoint root {})",
                dir.display(),
                self.root.display()
            )
        })?;
        if let Some(expected) = expected
            && expected != kind
        {
            bail!(
                "model {reference:?} (folder {}) is a {kind} checkpoint, but a {expected} checkpoint is needed here",
                dir.display()
            );
        }
        let found = inventory(&dir, &kind.required(&dir));
        let missing = found.missing;
        // Files that are there must also stay inside the root (through
        // symlinks), be readable, and weights well-formed.
        let mut broken = found.broken;
        let mut weight_bytes = 0;
        for file in &found.files {
            if let Err(why) = self.inside(file) {
                broken.push(why);
                continue;
            }
            if found.weights.contains(file) {
                match read_header(file) {
                    Ok(header) => weight_bytes += header.data_bytes,
                    Err(e) => broken.push(e.to_string()),
                }
            } else if let Err(e) = fs::File::open(file) {
                broken.push(format!("{} (unreadable: {e})", file.display()));
            }
        }
        if !missing.is_empty() || !broken.is_empty() {
            let mut msg = format!(
                "model {reference:?} ({kind}) is incomplete: checkpoint root {}, folder {}",
                self.root.display(),
                dir.display()
            );
            if !missing.is_empty() {
                msg.push_str(&format!("; missing: {}", missing.join(", ")));
            }
            if !broken.is_empty() {
                msg.push_str(&format!("; broken: {}", broken.join(", ")));
            }
            msg.push_str(" (nothing is downloaded)");
            bail!(msg);
        }
        Ok(ResolvedModel {
            reference: reference.to_owned(),
            dir,
            kind,
            files: found.files,
            weight_bytes,
        })
    }
}

impl CkptRoot {
    /// A file of a model folder must resolve, symlinks followed, to a regular
    /// file inside the root (HF-cache-style symlinks between the root's
    /// folders are fine).
    fn inside(&self, file: &Path) -> Result<(), String> {
        match fs::canonicalize(file) {
            Ok(real) if !real.starts_with(&self.root) => Err(format!(
                "{} leads outside the checkpoint root, to {}",
                file.display(),
                real.display()
            )),
            Ok(real) if !real.is_file() => Err(format!("{} is not a regular file", file.display())),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{} (unreadable: {e})", file.display())),
        }
    }
}

/// Tells a Qwen2.5-VL folder (config.json) from a Wan diffusers folder (model_index.json).
pub fn detect_kind(dir: &Path) -> Result<ModelKind> {
    let index = kubewan_wan::checkpoint::MODEL_INDEX.path(dir);
    if index.is_file() {
        let v: Value = read_json(&index, "a diffusers pipeline index")?;
        let class = v.get("_class_name").and_then(Value::as_str).unwrap_or("");
        if class.starts_with("Wan") {
            return Ok(ModelKind::Wan);
        }
        bail!(
            "{} names pipeline {class:?}; only Wan pipelines (WanImageToVideoPipeline) are supported",
            index.display()
        );
    }
    let config = kubewan_qwen2_5_vl::checkpoint::CONFIG.path(dir);
    if config.is_file() {
        let v: Value = read_json(&config, "a Hugging Face model config")?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type == "qwen2_5_vl" {
            return Ok(ModelKind::Qwen2_5Vl);
        }
        bail!(
            "{} has model_type {model_type:?}; expected \"qwen2_5_vl\" (or a diffusers folder with model_index.json)",
            config.display()
        );
    }
    bail!(
        "neither model_index.json (diffusers, Wan) nor config.json (Hugging Face, Qwen2.5-VL) is in {}",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_folder(dir: &Path) {
        kubewan_qwen2_5_vl::write_tiny_checkpoint(dir, 0).unwrap();
    }

    #[test]
    fn a_complete_qwen_folder_passes_and_a_missing_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        qwen_folder(&root.path().join("vlm"));
        let ckpts = CkptRoot::open(root.path()).unwrap();
        let m = ckpts.check("vlm", Some(ModelKind::Qwen2_5Vl)).unwrap();
        assert_eq!(m.kind, ModelKind::Qwen2_5Vl);
        assert!(m.weight_bytes > 0);
        fs::remove_file(root.path().join("vlm/tokenizer.json")).unwrap();
        fs::remove_file(root.path().join("vlm/preprocessor_config.json")).unwrap();
        let err = ckpts.check("vlm", None).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("preprocessor_config.json"),
            "{err}"
        );
        assert!(err.contains(&ckpts.path().display().to_string()), "{err}");
    }

    #[test]
    fn files_leading_outside_the_root_are_broken() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        qwen_folder(&root.path().join("vlm"));
        let tokenizer = root.path().join("vlm/tokenizer.json");
        fs::rename(&tokenizer, outside.path().join("tokenizer.json")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("tokenizer.json"), &tokenizer).unwrap();
        let ckpts = CkptRoot::open(root.path()).unwrap();
        let err = ckpts.check("vlm", None).unwrap_err().to_string();
        assert!(err.contains("leads outside the checkpoint root"), "{err}");
    }

    #[test]
    fn escapes_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        qwen_folder(&outside.path().join("m"));
        std::os::unix::fs::symlink(outside.path().join("m"), root.path().join("link")).unwrap();
        let ckpts = CkptRoot::open(root.path()).unwrap();
        for r in ["../x", "/etc", "a/../../x"] {
            let err = ckpts.resolve(r).unwrap_err().to_string();
            assert!(err.contains("must stay inside"), "{r}: {err}");
        }
        let err = ckpts.resolve("link").unwrap_err().to_string();
        assert!(err.contains("outside the root"), "{err}");
    }

    #[test]
    fn the_wrong_kind_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        qwen_folder(&root.path().join("vlm"));
        let ckpts = CkptRoot::open(root.path()).unwrap();
        let err = ckpts
            .check("vlm", Some(ModelKind::Wan))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is a qwen2_5_vl") && err.contains("wan (diffusers"),
            "{err}"
        );
    }
}
