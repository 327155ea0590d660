//! Offline checkpoint resolution. One root (canonicalised); every model
//! reference is relative to it and must stay inside it, symlinks included.
//! Each model kind declares the files it needs; a missing or unreadable file
//! gives ONE error naming the model, the root, the resolved folder and every
//! file that was looked for and not found. Nothing is ever downloaded.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
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
    /// Size of the weight files, bytes.
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
        let refused = |why: &str| {
            anyhow::anyhow!(
                "model {reference:?} {why}: model references are relative to the checkpoint root {} and must stay inside it",
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
                    "model {reference:?} not found: folder {} does not exist under the checkpoint root {} \
                     (nothing is downloaded; put the model folder there)",
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
        if !canonical.is_dir() {
            bail!(
                "model {reference:?}: {} is not a folder (checkpoint root {})",
                canonical.display(),
                self.root.display()
            );
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
        let mut missing = Vec::new();
        let mut files = Vec::new();
        let mut weights = Vec::new();
        match kind {
            ModelKind::Qwen2_5Vl => qwen_files(&dir, &mut files, &mut weights, &mut missing),
            ModelKind::Wan => wan_files(&dir, &mut files, &mut weights, &mut missing),
        }
        // Existing files must also be readable, and weights well-formed.
        let mut broken = Vec::new();
        for f in &files {
            if let Err(e) = fs::File::open(f) {
                broken.push(format!("{} (unreadable: {e})", f.display()));
            }
        }
        let mut weight_bytes = 0;
        for w in &weights {
            match check_safetensors(w) {
                Ok(size) => weight_bytes += size,
                Err(e) => broken.push(format!("{e:#}")),
            }
        }
        if !missing.is_empty() || !broken.is_empty() {
            let mut msg = format!(
                "model {reference:?} ({kind}) is incomplete: checkpoint root {}, folder {}",
                self.root.display(),
                dir.display()
            );
            if !missing.is_empty() {
                msg.push_str(&format!(
                    "; missing: {}",
                    missing
                        .iter()
                        .map(|p: &PathBuf| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
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
            files,
            weight_bytes,
        })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Tells a Qwen2.5-VL folder (config.json) from a Wan diffusers folder (model_index.json).
pub fn detect_kind(dir: &Path) -> Result<ModelKind> {
    let index = dir.join("model_index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let class = v.get("_class_name").and_then(Value::as_str).unwrap_or("");
        if class.starts_with("Wan") {
            return Ok(ModelKind::Wan);
        }
        bail!(
            "{} names pipeline {class:?}; only Wan pipelines (WanImageToVideoPipeline) are supported",
            index.display()
        );
    }
    let config = dir.join("config.json");
    if config.exists() {
        let v = read_json(&config)?;
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

fn need(path: PathBuf, files: &mut Vec<PathBuf>, missing: &mut Vec<PathBuf>) -> bool {
    if path.is_file() {
        files.push(path);
        true
    } else {
        missing.push(path);
        false
    }
}

/// Weights of a `stem`: `<stem>.safetensors`, or `<stem>.safetensors.index.json` and its shards.
fn weight_files(
    dir: &Path,
    stem: &str,
    files: &mut Vec<PathBuf>,
    weights: &mut Vec<PathBuf>,
    missing: &mut Vec<PathBuf>,
) {
    let single = dir.join(format!("{stem}.safetensors"));
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if single.is_file() {
        files.push(single.clone());
        weights.push(single);
        return;
    }
    if !index.is_file() {
        missing.push(single);
        missing.push(index);
        return;
    }
    files.push(index.clone());
    let shards: BTreeSet<String> = match read_json(&index) {
        Ok(v) => v
            .get("weight_map")
            .and_then(Value::as_object)
            .map(|m| {
                m.values()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => {
            missing.push(index);
            return;
        }
    };
    if shards.is_empty() {
        missing.push(dir.join(format!("{stem}-*.safetensors (the index lists no shards)")));
    }
    for shard in shards {
        let path = dir.join(&shard);
        if shard.contains("..") || Path::new(&shard).is_absolute() {
            missing.push(path);
            continue;
        }
        if need(path.clone(), files, missing) {
            weights.push(path);
        }
    }
}

fn qwen_files(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    weights: &mut Vec<PathBuf>,
    missing: &mut Vec<PathBuf>,
) {
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        need(dir.join(name), files, missing);
    }
    // The chat template: its own file (transformers 4.4x: .json, 5.x: .jinja)
    // or inside tokenizer_config.json.
    let in_tokenizer_config = read_json(&dir.join("tokenizer_config.json"))
        .ok()
        .is_some_and(|v| v.get("chat_template").is_some());
    let templates = ["chat_template.json", "chat_template.jinja"].map(|n| dir.join(n));
    match templates.iter().find(|p| p.is_file()) {
        Some(t) => files.push(t.clone()),
        None if in_tokenizer_config => {}
        None => missing.push(dir.join("chat_template.json (or chat_template.jinja)")),
    }
    weight_files(dir, "model", files, weights, missing);
}

fn wan_files(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    weights: &mut Vec<PathBuf>,
    missing: &mut Vec<PathBuf>,
) {
    let index_path = dir.join("model_index.json");
    files.push(index_path.clone());
    let Ok(index) = read_json(&index_path) else {
        missing.push(index_path);
        return;
    };
    let Some(components) = index.as_object() else {
        return;
    };
    for (name, value) in components {
        if name.starts_with('_') {
            continue;
        }
        // ["diffusers", "WanTransformer3DModel"], or [null, null] for an absent component.
        let class = value
            .as_array()
            .and_then(|a| a.get(1))
            .and_then(Value::as_str)
            .unwrap_or("");
        if class.is_empty() {
            continue;
        }
        let sub = dir.join(name);
        if !sub.is_dir() {
            missing.push(sub);
            continue;
        }
        if class.contains("Tokenizer") {
            if !sub.join("tokenizer.json").is_file() && !sub.join("spiece.model").is_file() {
                missing.push(sub.join("tokenizer.json (or spiece.model)"));
            } else {
                files.push(sub.join(if sub.join("tokenizer.json").is_file() {
                    "tokenizer.json"
                } else {
                    "spiece.model"
                }));
            }
        } else if class.contains("Scheduler") {
            need(sub.join("scheduler_config.json"), files, missing);
        } else if class.contains("Processor") || class.contains("ImageProcessor") {
            need(sub.join("preprocessor_config.json"), files, missing);
        } else {
            need(sub.join("config.json"), files, missing);
            // diffusers models: diffusion_pytorch_model; transformers models: model.
            let stem = if sub.join("model.safetensors").is_file()
                || sub.join("model.safetensors.index.json").is_file()
            {
                "model"
            } else {
                "diffusion_pytorch_model"
            };
            weight_files(&sub, stem, files, weights, missing);
        }
    }
}

/// Checks a safetensors file's header against its size: the header length,
/// the JSON header, each tensor's byte range (inside the file, matching its
/// dtype and shape). Returns the file size. Catches truncated files and files
/// that are not safetensors at all, without reading the weights.
pub fn check_safetensors(path: &Path) -> Result<u64> {
    let bad =
        |why: String| anyhow::anyhow!("{} is not a valid safetensors file: {why}", path.display());
    let mut file = fs::File::open(path).map_err(|e| bad(format!("cannot open ({e})")))?;
    let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| bad(format!("only {size} bytes, shorter than its header")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len == 0 || header_len > 100 << 20 || 8 + header_len > size {
        return Err(bad(format!(
            "header length {header_len} does not fit the file's {size} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read the header ({e})")))?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the header is not JSON ({e})")))?;
    let tensors = header
        .as_object()
        .ok_or_else(|| bad("the header is not a JSON object".into()))?;
    let data_len = size - 8 - header_len;
    let mut end_max = 0u64;
    for (name, info) in tensors {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(Value::as_str).unwrap_or("");
        let item = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
            other => return Err(bad(format!("tensor {name:?} has unknown dtype {other:?}"))),
        };
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .ok_or_else(|| bad(format!("tensor {name:?} has no shape")))?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let [begin, end] = offsets[..] else {
            return Err(bad(format!("tensor {name:?} has no data_offsets")));
        };
        let numel: u64 = shape.iter().product();
        if end < begin || end - begin != numel * item {
            return Err(bad(format!(
                "tensor {name:?} ({dtype} {shape:?}) has {} bytes, expected {}",
                end.saturating_sub(begin),
                numel * item
            )));
        }
        end_max = end_max.max(end);
    }
    if end_max > data_len {
        return Err(bad(format!(
            "truncated: its tensors need {end_max} bytes of data, the file holds {data_len}"
        )));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors(path: &Path, floats: usize) {
        let header = format!(
            "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{floats}],\"data_offsets\":[0,{}]}}}}",
            floats * 4
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, floats * 4));
        fs::write(path, bytes).unwrap();
    }

    fn qwen_folder(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("config.json"), r#"{"model_type":"qwen2_5_vl"}"#).unwrap();
        for f in [
            "tokenizer.json",
            "preprocessor_config.json",
            "chat_template.json",
        ] {
            fs::write(dir.join(f), "{}").unwrap();
        }
        fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
        safetensors(&dir.join("model.safetensors"), 16);
    }

    #[test]
    fn a_complete_qwen_folder_passes_and_a_missing_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        qwen_folder(&root.path().join("vlm"));
        let ckpts = CkptRoot::open(root.path()).unwrap();
        let m = ckpts.check("vlm", Some(ModelKind::Qwen2_5Vl)).unwrap();
        assert_eq!(m.kind, ModelKind::Qwen2_5Vl);
        assert!(m.weight_bytes > 64);
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
    fn truncated_and_mislabelled_safetensors_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        safetensors(&p, 100);
        assert!(check_safetensors(&p).is_ok());
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let err = check_safetensors(&p).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        fs::write(&p, b"\x89PNG\r\n\x1a\n not weights at all").unwrap();
        let err = check_safetensors(&p).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors"), "{err}");
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
