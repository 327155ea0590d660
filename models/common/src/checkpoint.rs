//! Checkpoint catalogues. Each model crate lists, as data, every file its
//! loader reads from a model folder and why ([`Required`]); [`inventory`]
//! resolves such a list against a folder (weight stems through their shard
//! indexes) and says what is there and what is missing. Loaders read their
//! files through the catalogue's entries and check it before reading
//! anything ([`require`]); the runner's checkpoint check uses the same
//! catalogue, so the two cannot disagree.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::LoadError;
use crate::safetensors::{TensorTransform, weight_files};

/// A file a loader reads.
#[derive(Debug, Clone, Copy)]
pub struct RequiredFile {
    /// The component folder it lives in (a diffusers component such as
    /// `transformer`), or "" for the model folder itself.
    pub component: &'static str,
    /// Its names, in the loader's order of preference: the first that exists is read.
    pub names: &'static [&'static str],
    /// Why the loader reads it.
    pub why: &'static str,
    /// Reads the file as its loader would (a config into the model's config
    /// type, a tokenizer through the tokenizer library...) and says what is
    /// wrong with it: a file that passes is one the loader can use.
    pub check: fn(&Path) -> Result<(), String>,
}

/// The [`RequiredFile::check`] of a file whose content is not looked at.
pub fn any_content(_: &Path) -> Result<(), String> {
    Ok(())
}

/// The [`RequiredFile::check`] of a `tokenizer.json`: loaded by the
/// tokenizers library, as the models load it.
pub fn check_tokenizer(path: &Path) -> Result<(), String> {
    tokenizers::Tokenizer::from_file(path)
        .map(drop)
        .map_err(|e| {
            format!(
                "{}: not a tokenizer the loader can read: {e}",
                path.display()
            )
        })
}

impl RequiredFile {
    /// The file of `component_dir` the loader reads: the first of the names
    /// that exists, or the first name when none does (so errors name it).
    pub fn path(&self, component_dir: &Path) -> PathBuf {
        self.find(component_dir)
            .unwrap_or_else(|| component_dir.join(self.names[0]))
    }

    /// Reads the file of `component_dir` as JSON (`what` names it in errors).
    pub fn read_json<T: DeserializeOwned>(
        &self,
        component_dir: &Path,
        what: &'static str,
    ) -> Result<T, LoadError> {
        crate::read_json(&self.path(component_dir), what)
    }

    fn find(&self, component_dir: &Path) -> Option<PathBuf> {
        self.names
            .iter()
            .map(|name| component_dir.join(name))
            .find(|path| path.is_file())
    }
}

/// Safetensors weights a loader reads: `<stem>.safetensors`, or
/// `<stem>.safetensors.index.json` and every shard it lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequiredWeights {
    /// The component folder they live in, or "" for the model folder itself.
    pub component: &'static str,
    pub stem: &'static str,
    /// What the weights are.
    pub why: &'static str,
}

impl RequiredWeights {
    /// The weights of `component_dir`, floats in `dtype`, on `device` (see
    /// [`crate::safetensors::var_builder`]).
    pub fn var_builder(
        &self,
        component_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, LoadError> {
        crate::safetensors::var_builder(component_dir, self.stem, dtype, device)
    }

    /// [`Self::var_builder`] with every tensor passed through `transform` as it
    /// is read (see [`crate::safetensors::var_builder_with`]).
    pub fn var_builder_with<E: From<LoadError>>(
        &self,
        component_dir: &Path,
        dtype: DType,
        device: &Device,
        transform: &mut TensorTransform<'_, E>,
    ) -> Result<VarBuilder<'static>, E> {
        crate::safetensors::var_builder_with(component_dir, self.stem, dtype, device, transform)
    }
}

/// One entry of a model's catalogue.
#[derive(Debug, Clone, Copy)]
pub enum Required {
    File(RequiredFile),
    Weights(RequiredWeights),
}

impl Required {
    /// The folder of the entry's component inside `model_dir`.
    pub fn component_dir(&self, model_dir: &Path) -> PathBuf {
        let component = match self {
            Required::File(f) => f.component,
            Required::Weights(w) => w.component,
        };
        if component.is_empty() {
            model_dir.to_owned()
        } else {
            model_dir.join(component)
        }
    }
}

/// A model folder measured against its catalogue.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// Every required file that is there (configs, tokenizers, weight indexes
    /// and shards), in catalogue order.
    pub files: Vec<PathBuf>,
    /// The safetensors files among them.
    pub weights: Vec<PathBuf>,
    /// Every required file that is not there: `<path> (<why>)`, alternatives
    /// joined by " or ".
    pub missing: Vec<String>,
    /// Files that are there but cannot be used (a config that is not the
    /// model's config type, a tokenizer that does not load, a weight index
    /// that is not JSON or names a shard outside the folder), one message each.
    pub broken: Vec<String>,
}

impl Inventory {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.broken.is_empty()
    }
}

/// Resolves `required` against `model_dir`: what is there, what is missing,
/// what is broken. Files must be regular files (a FIFO or a device counts as
/// missing) and pass their entry's [`RequiredFile::check`]; shard indexes
/// are read; the weights' headers are for [`crate::safetensors::read_header`].
pub fn inventory(model_dir: &Path, required: &[Required]) -> Inventory {
    let mut inventory = Inventory::default();
    for entry in required {
        let dir = entry.component_dir(model_dir);
        match entry {
            Required::File(file) => match file.find(&dir) {
                Some(path) => {
                    if let Err(why) = (file.check)(&path) {
                        inventory.broken.push(why);
                    }
                    inventory.files.push(path);
                }
                None => {
                    let names: Vec<String> = file
                        .names
                        .iter()
                        .map(|n| dir.join(n).display().to_string())
                        .collect();
                    inventory
                        .missing
                        .push(format!("{} ({})", names.join(" or "), file.why));
                }
            },
            Required::Weights(weights) => add_weights(&mut inventory, &dir, weights),
        }
    }
    inventory
}

fn add_weights(inventory: &mut Inventory, dir: &Path, weights: &RequiredWeights) {
    let stem = weights.stem;
    match weight_files(dir, stem) {
        Ok(files) => {
            inventory.files.extend(files.index.clone());
            for shard in files.shards {
                if shard.is_file() {
                    inventory.files.push(shard.clone());
                    inventory.weights.push(shard);
                } else {
                    let listed = match &files.index {
                        Some(index) => format!("listed in {}; ", index.display()),
                        None => String::new(),
                    };
                    inventory.missing.push(format!(
                        "{} ({listed}{})",
                        shard.display(),
                        weights.why
                    ));
                }
            }
        }
        Err(LoadError::NoWeights { .. }) => inventory.missing.push(format!(
            "{} or {} ({})",
            dir.join(format!("{stem}.safetensors")).display(),
            dir.join(format!("{stem}.safetensors.index.json")).display(),
            weights.why
        )),
        Err(e) => inventory.broken.push(e.to_string()),
    }
}

/// The inventory of `model_dir`, or one error naming every missing or broken
/// entry: what a loader calls before it reads anything.
pub fn require(model_dir: &Path, required: &[Required]) -> Result<Inventory, LoadError> {
    let inventory = inventory(model_dir, required);
    if inventory.is_complete() {
        return Ok(inventory);
    }
    Err(LoadError::Incomplete {
        dir: model_dir.to_owned(),
        problems: inventory
            .missing
            .iter()
            .map(|m| format!("missing {m}"))
            .chain(inventory.broken.iter().cloned())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: RequiredFile = RequiredFile {
        component: "",
        names: &["template.jinja", "template.json"],
        why: "the template",
        check: any_content,
    };
    const CATALOGUE: &[Required] = &[
        Required::File(TEMPLATE),
        Required::File(RequiredFile {
            component: "part",
            names: &["config.json"],
            why: "the part's config",
            check: json_object,
        }),
        Required::Weights(RequiredWeights {
            component: "part",
            stem: "model",
            why: "the part's weights",
        }),
    ];

    fn json_object(path: &Path) -> Result<(), String> {
        crate::read_json::<serde_json::Map<String, serde_json::Value>>(path, "a config")
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn files_that_do_not_pass_their_check_are_broken() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("part")).unwrap();
        std::fs::write(dir.path().join("template.json"), "{}").unwrap();
        std::fs::write(dir.path().join("part/config.json"), "[1, 2]").unwrap();
        let inv = inventory(dir.path(), CATALOGUE);
        assert!(
            inv.broken.len() == 1 && inv.broken[0].contains("part/config.json"),
            "{:?}",
            inv.broken
        );
    }

    #[test]
    fn every_missing_entry_is_named_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory(dir.path(), CATALOGUE);
        assert!(inv.files.is_empty() && inv.broken.is_empty());
        let root = dir.path().display();
        assert_eq!(
            inv.missing,
            [
                format!("{root}/template.jinja or {root}/template.json (the template)"),
                format!("{root}/part/config.json (the part's config)"),
                format!(
                    "{root}/part/model.safetensors or {root}/part/model.safetensors.index.json \
                     (the part's weights)"
                ),
            ]
        );
        let err = require(dir.path(), CATALOGUE).unwrap_err().to_string();
        assert_eq!(err.matches("missing ").count(), 3, "{err}");
    }

    #[test]
    fn alternatives_and_shards_resolve_like_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("part");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::write(dir.path().join("template.json"), "{}").unwrap();
        std::fs::write(part.join("config.json"), "{}").unwrap();
        std::fs::write(
            part.join("model.safetensors.index.json"),
            r#"{"weight_map":{"a":"model-1.safetensors","b":"model-2.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(part.join("model-1.safetensors"), "").unwrap();
        let inv = inventory(dir.path(), CATALOGUE);
        assert_eq!(inv.weights, [part.join("model-1.safetensors")]);
        assert_eq!(inv.files.len(), 4);
        assert_eq!(inv.missing.len(), 1);
        assert!(
            inv.missing[0].contains("model-2.safetensors (listed in"),
            "{:?}",
            inv.missing
        );
        // the loader reads the first name that exists
        assert_eq!(TEMPLATE.path(dir.path()), dir.path().join("template.json"));
        std::fs::write(dir.path().join("template.jinja"), "").unwrap();
        assert_eq!(TEMPLATE.path(dir.path()), dir.path().join("template.jinja"));
        std::fs::write(part.join("model.safetensors.index.json"), "not json").unwrap();
        let inv = inventory(dir.path(), CATALOGUE);
        assert!(
            inv.broken.len() == 1 && inv.broken[0].contains("not valid JSON"),
            "{:?}",
            inv.broken
        );
    }
}
