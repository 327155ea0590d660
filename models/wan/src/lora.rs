//! LoRAs merged into a Wan transformer while it loads: each weight the loader reads gets the
//! deltas of the LoRAs that name its module before the next weight is read, in the load dtype,
//! so there is no extra resident copy, no runtime cost, and the load's peak stays the weights
//! plus one tensor. A LoRA file is indexed from its header alone; its tensors are read when the
//! weight they change is loaded.
//!
//! Two file layouts, read as diffusers' `WanLoraLoaderMixin` reads them:
//! - **diffusers / PEFT**: `transformer.<module>.lora_A.weight`, `.lora_B.weight` and optional
//!   `.lora_B.bias` (the prefix may be absent; `lora_down`/`lora_up` are accepted for A/B).
//!   The delta is `scale · α/r · B·A` (and `scale · α/r · bias`), α and r from the adapter config
//!   diffusers saves in the file's metadata (`lora_adapter_metadata`: `lora_alpha`,
//!   `alpha_pattern`, `use_rslora`); without metadata α = r.
//! - **original Wan / ComfyUI** (`diffusion_model.` + the original module names, converted as
//!   `_convert_non_diffusers_wan_lora_to_diffusers` does): `lora_down`/`lora_up` (or
//!   `lora_A`/`lora_B`) with an optional `alpha` (delta `scale · α/rank · up·down`), `diff_b`
//!   (a bias difference) and `head.head.diff` (a full difference of `proj_out.weight`). Like
//!   diffusers, `diff`/`diff_b` tensors of norm layers and any other `diff` tensor (e.g. of the
//!   modulation) are left unused, and reported; unlike diffusers, an `alpha` outside the blocks
//!   (diffusers refuses such files) is applied like the others.
//!
//! Several LoRAs add up. A key this module does not understand, a module the transformer lacks
//! (checked once every weight is loaded: [`LoraMerge::finish`]) and a delta whose shape does not
//! fit its weight are each one error naming the LoRA file and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use kubewan_model_common::safetensors::SafetensorsFile;

use crate::{Error, Result};

/// A LoRA file and the strength it is merged with (1.0: as trained).
#[derive(Debug, Clone, PartialEq)]
pub struct Lora {
    pub path: PathBuf,
    pub scale: f64,
}

impl Lora {
    /// `PATH[:SCALE]` (the CLI's form): the scale after the last `:` when it is a number, else 1.0.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some((path, scale)) = text.rsplit_once(':')
            && let Ok(scale) = scale.parse::<f64>()
        {
            if !scale.is_finite() {
                return Err(Error::msg(format!(
                    "LoRA {text:?}: the scale must be finite"
                )));
            }
            return Ok(Self {
                path: path.into(),
                scale,
            });
        }
        Ok(Self {
            path: text.into(),
            scale: 1.0,
        })
    }
}

/// Where a LoRA tensor goes in its module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The low-rank down projection `A` `[r, in]`.
    Down,
    /// The low-rank up projection `B` `[out, r]`.
    Up,
    /// The scalar α of the original layout.
    Alpha,
    /// A difference added to the bias.
    Bias,
    /// A full difference added to the weight.
    Diff,
}

/// What one file changes in one module: the names of its tensors by role.
#[derive(Debug, Default)]
struct ModuleDelta {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
    bias: Option<String>,
    diff: Option<String>,
    /// α from the adapter config (diffusers layout with metadata).
    config_alpha: Option<f64>,
    /// Whether the weight / the bias part was merged.
    weight_merged: bool,
    bias_merged: bool,
}

impl ModuleDelta {
    fn slot(&mut self, role: Role) -> &mut Option<String> {
        match role {
            Role::Down => &mut self.down,
            Role::Up => &mut self.up,
            Role::Alpha => &mut self.alpha,
            Role::Bias => &mut self.bias,
            Role::Diff => &mut self.diff,
        }
    }

    fn changes_weight(&self) -> bool {
        self.down.is_some() || self.up.is_some() || self.diff.is_some()
    }

    /// Every key of the module, for error messages.
    fn keys(&self) -> Vec<&str> {
        [&self.down, &self.up, &self.alpha, &self.bias, &self.diff]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }
}

/// The adapter settings diffusers saves in a LoRA's metadata (keys `transformer.<field>`).
#[derive(Debug, Default)]
struct AdapterConfig {
    lora_alpha: f64,
    alpha_pattern: BTreeMap<String, f64>,
    use_rslora: bool,
}

impl AdapterConfig {
    /// PEFT's `LoraConfig` defaults for fields the metadata leaves out.
    const DEFAULT_ALPHA: f64 = 8.0;

    fn from_metadata(json: &str) -> std::result::Result<Self, String> {
        let all: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|e| format!("not a JSON object: {e}"))?;
        let field = |name: &str| all.get(&format!("transformer.{name}"));
        if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err("a DoRA adapter (use_dora), which cannot be merged as a LoRA".into());
        }
        let alpha_pattern = match field("alpha_pattern") {
            Some(serde_json::Value::Object(map)) => map
                .iter()
                .map(|(k, v)| {
                    v.as_f64()
                        .map(|a| (k.clone(), a))
                        .ok_or_else(|| format!("alpha_pattern {k:?} is not a number"))
                })
                .collect::<std::result::Result<_, _>>()?,
            _ => BTreeMap::new(),
        };
        if let Some(bad) = alpha_pattern.keys().find(|k| {
            k.trim_start_matches('^')
                .contains(['*', '+', '?', '[', '(', '|', '$', '\\'])
        }) {
            return Err(format!(
                "alpha_pattern {bad:?} is a regular expression; only module names are supported"
            ));
        }
        Ok(Self {
            lora_alpha: field("lora_alpha")
                .and_then(|v| v.as_f64())
                .unwrap_or(Self::DEFAULT_ALPHA),
            alpha_pattern,
            use_rslora: field("use_rslora").and_then(|v| v.as_bool()) == Some(true),
        })
    }

    /// α of `module`: the first `alpha_pattern` entry naming it (PEFT matches a pattern
    /// against the end of the module name; `^` anchors it to the whole name), else `lora_alpha`.
    fn alpha(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(pattern, _)| match pattern.strip_prefix('^') {
                Some(whole) => module == whole,
                None => module == *pattern || module.ends_with(&format!(".{pattern}")),
            })
            .map(|(_, &a)| a)
            .unwrap_or(self.lora_alpha)
    }
}

/// One opened LoRA file, indexed by the transformer module each tensor changes.
#[derive(Debug)]
struct LoraFile {
    file: SafetensorsFile,
    scale: f64,
    config: Option<AdapterConfig>,
    modules: BTreeMap<String, ModuleDelta>,
    /// Keys left unused as diffusers leaves them.
    unused: Vec<String>,
}

/// The diffusers name of a module of the original Wan checkpoint (`blocks.3.self_attn.q` →
/// `blocks.3.attn1.to_q`), as `_convert_non_diffusers_wan_lora_to_diffusers` renames them.
fn diffusers_module(original: &str) -> Option<String> {
    let fixed = match original {
        "time_projection.1" => Some("condition_embedder.time_proj"),
        "head.head" => Some("proj_out"),
        "text_embedding.0" => Some("condition_embedder.text_embedder.linear_1"),
        "text_embedding.2" => Some("condition_embedder.text_embedder.linear_2"),
        "time_embedding.0" => Some("condition_embedder.time_embedder.linear_1"),
        "time_embedding.2" => Some("condition_embedder.time_embedder.linear_2"),
        "img_emb.proj.1" => Some("condition_embedder.image_embedder.ff.net.0.proj"),
        "img_emb.proj.3" => Some("condition_embedder.image_embedder.ff.net.2"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = original.strip_prefix("blocks.")?;
    let (block, layer) = rest.split_once('.')?;
    block.parse::<usize>().ok()?;
    let layer = match layer {
        "self_attn.q" => "attn1.to_q",
        "self_attn.k" => "attn1.to_k",
        "self_attn.v" => "attn1.to_v",
        "self_attn.o" => "attn1.to_out.0",
        "cross_attn.q" => "attn2.to_q",
        "cross_attn.k" => "attn2.to_k",
        "cross_attn.v" => "attn2.to_v",
        "cross_attn.o" => "attn2.to_out.0",
        "cross_attn.k_img" => "attn2.add_k_proj",
        "cross_attn.v_img" => "attn2.add_v_proj",
        "ffn.0" => "ffn.net.0.proj",
        "ffn.2" => "ffn.net.2",
        _ => return None,
    };
    Some(format!("blocks.{block}.{layer}"))
}

/// Splits a key into (module, role) by its ending; `diff`/`alpha` only in the original layout.
fn split_key(key: &str, original: bool) -> Option<(&str, Role)> {
    let mut endings = vec![
        (".lora_A.weight", Role::Down),
        (".lora_down.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora_up.weight", Role::Up),
    ];
    if original {
        endings.extend([
            (".alpha", Role::Alpha),
            (".diff_b", Role::Bias),
            (".diff", Role::Diff),
        ]);
    } else {
        endings.push((".lora_B.bias", Role::Bias));
    }
    endings
        .into_iter()
        .find_map(|(end, role)| key.strip_suffix(end).map(|m| (m, role)))
}

const ORIGINAL_PREFIX: &str = "diffusion_model.";
const DIFFUSERS_PREFIX: &str = "transformer.";

/// Where a key of a LoRA file goes.
#[derive(Debug, PartialEq)]
enum Target {
    /// A tensor of the (diffusers-named) module's delta.
    Module(String, Role),
    /// Left unused, as diffusers leaves it.
    Unused,
}

/// Where `key` goes, in a file of the original layout or not; the error says what is wrong.
fn target(key: &str, original: bool) -> std::result::Result<Target, String> {
    if key.contains("dora_scale") {
        return Err(format!(
            "key {key:?}: DoRA adapters cannot be merged as LoRAs"
        ));
    }
    if !original {
        let rest = key.strip_prefix(DIFFUSERS_PREFIX).unwrap_or(key);
        let (module, role) = split_key(rest, false).ok_or_else(|| {
            format!(
                "key {key:?} is not a diffusers LoRA tensor ([{DIFFUSERS_PREFIX}]<module>.lora_A.weight, \
                 .lora_B.weight or .lora_B.bias)"
            )
        })?;
        return Ok(Target::Module(module.to_owned(), role));
    }
    let rest = key.strip_prefix(ORIGINAL_PREFIX).ok_or_else(|| {
        format!("key {key:?} lacks the {ORIGINAL_PREFIX:?} prefix of the file's other keys")
    })?;
    let (module, role) = split_key(rest, true).ok_or_else(|| {
        format!(
            "key {key:?} is not a Wan LoRA tensor ({ORIGINAL_PREFIX}<module>.lora_down.weight, \
             .lora_up.weight, .alpha, .diff or .diff_b)"
        )
    })?;
    let difference = matches!(role, Role::Bias | Role::Diff);
    // diffusers drops the norms' differences and leaves every `diff` but the head's, and any
    // difference without a module to go to, unused.
    match diffusers_module(module) {
        _ if difference && module.contains("norm") => Ok(Target::Unused),
        Some(m) if role != Role::Diff || m == "proj_out" => Ok(Target::Module(m, role)),
        _ if difference => Ok(Target::Unused),
        _ => Err(format!(
            "key {key:?}: no module of the Wan transformer is called {module:?}"
        )),
    }
}

impl LoraFile {
    fn open(lora: &Lora) -> Result<Self> {
        let file = SafetensorsFile::open(&lora.path)?;
        let err = |what: String| Error::Lora {
            path: lora.path.clone(),
            what,
        };
        let keys: Vec<String> = file.header.tensors.keys().cloned().collect();
        if keys.is_empty() {
            return Err(err("it holds no tensors".into()));
        }
        let original = keys.iter().any(|k| k.starts_with(ORIGINAL_PREFIX));
        let config = match file.header.metadata.get("lora_adapter_metadata") {
            Some(json) if !original => Some(
                AdapterConfig::from_metadata(json)
                    .map_err(|e| err(format!("its lora_adapter_metadata: {e}")))?,
            ),
            _ => None,
        };
        let mut modules: BTreeMap<String, ModuleDelta> = BTreeMap::new();
        let mut unused = Vec::new();
        for key in keys {
            match target(&key, original).map_err(&err)? {
                Target::Unused => unused.push(key),
                Target::Module(module, role) => {
                    let slot = modules.entry(module).or_default().slot(role);
                    if let Some(other) = slot {
                        return Err(err(format!(
                            "keys {other:?} and {key:?} both give the same tensor"
                        )));
                    }
                    *slot = Some(key);
                }
            }
        }
        for (module, delta) in &mut modules {
            // diffusers' conversion drops a time projection with only bias differences, and the
            // image embedder's bias differences without their LoRA.
            let bias_needs_lora = module == "condition_embedder.time_proj"
                || module.starts_with("condition_embedder.image_embedder.");
            if original && bias_needs_lora && delta.up.is_none() {
                unused.extend(delta.bias.take());
            }
            let missing = match (&delta.down, &delta.up, &delta.alpha) {
                (Some(_), Some(_), _) | (None, None, None) => None,
                (Some(key), None, _) => Some((key, "up (lora_B / lora_up) tensor")),
                (None, Some(key), _) => Some((key, "down (lora_A / lora_down) tensor")),
                (None, None, Some(key)) => Some((key, "down and up tensors")),
            };
            if let Some((key, what)) = missing {
                return Err(err(format!("key {key:?} comes without its {what}")));
            }
            if let Some(config) = &config {
                delta.config_alpha = Some(config.alpha(module));
            }
        }
        modules.retain(|_, d| !d.keys().is_empty());
        Ok(Self {
            file,
            scale: lora.scale,
            config,
            modules,
            unused,
        })
    }

    fn err(&self, what: String) -> Error {
        Error::Lora {
            path: self.file.path().to_owned(),
            what,
        }
    }

    /// A tensor of the file in f32 on the device of `like`.
    fn tensor(&self, key: &str, like: &Tensor) -> Result<Tensor> {
        Ok(self
            .file
            .tensor(key)?
            .to_dtype(DType::F32)?
            .to_device(like.device())?)
    }

    /// The weight difference of `module` (f32, scaled), checked against `weight`.
    fn weight_delta(&self, module: &str, weight: &Tensor) -> Result<Option<Tensor>> {
        let Some(delta) = self.modules.get(module) else {
            return Ok(None);
        };
        let mut total: Option<Tensor> = None;
        let mut add = |t: Tensor| -> Result<()> {
            total = Some(match total.take() {
                Some(acc) => (acc + t)?,
                None => t,
            });
            Ok(())
        };
        // (a lone half was refused when the file was opened)
        if let (Some(down), Some(up)) = (&delta.down, &delta.up) {
            let a = self.tensor(down, weight)?;
            let b = self.tensor(up, weight)?;
            let (rank, fits) = match (a.dims(), b.dims()) {
                ([r, i], [o, r2]) => (*r, r == r2 && [*o, *i] == weight.dims()),
                _ => (0, false),
            };
            if !fits {
                return Err(self.err(format!(
                    "keys {down:?} {:?} and {up:?} {:?} do not make a difference of \
                         {module}.weight {:?}",
                    a.dims(),
                    b.dims(),
                    weight.dims()
                )));
            }
            let factor = self.factor(delta, rank, weight)?;
            add(b.matmul(&a)?.affine(self.scale * factor, 0.0)?)?;
        }
        if let Some(key) = &delta.diff {
            let diff = self.tensor(key, weight)?;
            if diff.dims() != weight.dims() {
                return Err(self.err(format!(
                    "key {key:?} {:?} does not fit {module}.weight {:?}",
                    diff.dims(),
                    weight.dims()
                )));
            }
            add(diff.affine(self.scale, 0.0)?)?;
        }
        Ok(total)
    }

    /// α/r of a module's low-rank pair: the file's `alpha` tensor or the adapter config's α
    /// over the pair's rank (√rank with rsLoRA), 1 when neither gives an α.
    fn factor(&self, delta: &ModuleDelta, rank: usize, like: &Tensor) -> Result<f64> {
        let alpha = match (&delta.alpha, delta.config_alpha) {
            (Some(key), _) => {
                let a = self.tensor(key, like)?.flatten_all()?;
                if a.elem_count() != 1 {
                    return Err(self.err(format!("key {key:?} is not a scalar: {:?}", a.dims())));
                }
                a.to_vec1::<f32>()?[0] as f64
            }
            (None, Some(alpha)) => alpha,
            (None, None) => return Ok(1.0),
        };
        Ok(self.alpha_over_rank(alpha, rank))
    }

    /// α/r, or α/√r with rsLoRA.
    fn alpha_over_rank(&self, alpha: f64, rank: usize) -> f64 {
        let rslora = self.config.as_ref().is_some_and(|c| c.use_rslora);
        alpha
            / if rslora {
                (rank as f64).sqrt()
            } else {
                rank as f64
            }
    }

    /// The bias difference of `module` (f32, scaled), checked against `bias`.
    fn bias_delta(&self, module: &str, bias: &Tensor) -> Result<Option<Tensor>> {
        let Some(delta) = self.modules.get(module) else {
            return Ok(None);
        };
        let Some(key) = &delta.bias else {
            return Ok(None);
        };
        let b = self.tensor(key, bias)?;
        if b.dims() != bias.dims() {
            return Err(self.err(format!(
                "key {key:?} {:?} does not fit {module}.bias {:?}",
                b.dims(),
                bias.dims()
            )));
        }
        // A lora_B bias is scaled like its module's pair by PEFT (`scaling` = α/r of the adapter
        // config); the original layout's `alpha` is folded into the down/up weights only.
        let factor = match (&delta.up, delta.config_alpha) {
            (Some(up), Some(alpha)) => {
                let rank = self.file.header.tensors[up]
                    .shape
                    .get(1)
                    .copied()
                    .unwrap_or(1);
                self.alpha_over_rank(alpha, rank)
            }
            _ => 1.0,
        };
        Ok(Some(b.affine(self.scale * factor, 0.0)?))
    }
}

/// The LoRAs of one transformer load: hand [`LoraMerge::apply`] to the loader, then call
/// [`LoraMerge::finish`].
#[derive(Debug)]
pub struct LoraMerge {
    files: Vec<LoraFile>,
}

impl LoraMerge {
    /// Opens and indexes every LoRA (headers only).
    pub fn open(loras: &[Lora]) -> Result<Self> {
        Ok(Self {
            files: loras.iter().map(LoraFile::open).collect::<Result<_>>()?,
        })
    }

    /// The loader's per-tensor transform: `tensor` (named as in the checkpoint) plus every
    /// LoRA's difference for it, summed in f32 and returned in the tensor's dtype.
    pub fn apply(&mut self, name: &str, tensor: Tensor) -> Result<Tensor> {
        let (module, is_weight) = match (name.strip_suffix(".weight"), name.strip_suffix(".bias")) {
            (Some(m), _) => (m, true),
            (_, Some(m)) => (m, false),
            _ => return Ok(tensor),
        };
        let mut deltas = Vec::new();
        for file in &mut self.files {
            let delta = if is_weight {
                file.weight_delta(module, &tensor)?
            } else {
                file.bias_delta(module, &tensor)?
            };
            if let Some(delta) = delta {
                deltas.push(delta);
                let merged = file.modules.get_mut(module).expect("a delta came from it");
                if is_weight {
                    merged.weight_merged = true;
                } else {
                    merged.bias_merged = true;
                }
            }
        }
        if deltas.is_empty() {
            return Ok(tensor);
        }
        let dtype = tensor.dtype();
        let mut merged = tensor.to_dtype(DType::F32)?;
        for delta in deltas {
            merged = (merged + delta)?;
        }
        Ok(merged.to_dtype(dtype)?)
    }

    /// After the load: an error naming every key whose module `transformer_dir`'s weights do
    /// not have; otherwise what was left unused as diffusers leaves it (one line per file).
    pub fn finish(self, transformer_dir: &Path) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        for file in self.files {
            let missing: Vec<String> = file
                .modules
                .iter()
                .filter(|(_, d)| {
                    (d.changes_weight() && !d.weight_merged) || (d.bias.is_some() && !d.bias_merged)
                })
                .flat_map(|(module, d)| {
                    d.keys()
                        .into_iter()
                        .map(move |k| format!("{k:?} ({module})"))
                })
                .collect();
            if !missing.is_empty() {
                return Err(file.err(format!(
                    "{} key(s) name modules that the transformer {} does not have: {}",
                    missing.len(),
                    transformer_dir.display(),
                    missing.join(", ")
                )));
            }
            if !file.unused.is_empty() {
                notes.push(format!(
                    "LoRA {}: {} tensor(s) left unused, as diffusers leaves them (norm and other `diff` \
                     tensors): {}",
                    file.file.path().display(),
                    file.unused.len(),
                    file.unused.join(", ")
                ));
            }
        }
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_module_names_map_to_diffusers_names() {
        assert_eq!(
            diffusers_module("blocks.12.self_attn.o").as_deref(),
            Some("blocks.12.attn1.to_out.0")
        );
        assert_eq!(
            diffusers_module("blocks.0.cross_attn.v_img").as_deref(),
            Some("blocks.0.attn2.add_v_proj")
        );
        assert_eq!(diffusers_module("head.head").as_deref(), Some("proj_out"));
        assert_eq!(diffusers_module("blocks.x.ffn.0"), None);
        assert_eq!(diffusers_module("blocks.0.modulation"), None);
    }

    #[test]
    fn keys_go_to_modules_are_left_unused_or_are_refused() {
        let module = |m: &str, r| Ok(Target::Module(m.to_owned(), r));
        let t = |key: &str| target(key, key.starts_with(ORIGINAL_PREFIX));
        assert_eq!(
            t("diffusion_model.blocks.0.self_attn.q.lora_down.weight"),
            module("blocks.0.attn1.to_q", Role::Down)
        );
        assert_eq!(
            t("diffusion_model.blocks.3.ffn.2.diff_b"),
            module("blocks.3.ffn.net.2", Role::Bias)
        );
        assert_eq!(
            t("diffusion_model.head.head.diff"),
            module("proj_out", Role::Diff)
        );
        for unused in [
            "diffusion_model.blocks.0.norm3.diff",
            "diffusion_model.blocks.0.modulation.diff",
            "diffusion_model.blocks.0.self_attn.q.diff",
        ] {
            assert_eq!(t(unused), Ok(Target::Unused), "{unused}");
        }
        assert_eq!(
            t("transformer.blocks.0.attn1.to_q.lora_B.bias"),
            module("blocks.0.attn1.to_q", Role::Bias)
        );
        assert_eq!(t("proj_out.lora_A.weight"), module("proj_out", Role::Down));
        for (key, why) in [
            (
                "diffusion_model.blocks.0.adapter.lora_down.weight",
                "no module",
            ),
            (
                "transformer.blocks.0.attn1.to_q.weight",
                "not a diffusers LoRA",
            ),
            (
                "transformer.blocks.0.attn1.to_q.lora_magnitude_vector",
                "not a diffusers",
            ),
            ("transformer.proj_out.dora_scale", "DoRA"),
        ] {
            let err = t(key).unwrap_err();
            assert!(err.contains(why) && err.contains(key), "{err}");
        }
        assert!(
            target("blocks.0.attn1.to_q.lora_A.weight", true)
                .unwrap_err()
                .contains("lacks the \"diffusion_model.\" prefix")
        );
    }

    #[test]
    fn the_scale_follows_the_last_colon_when_it_is_a_number() {
        assert_eq!(Lora::parse("a/b.safetensors:0.5").unwrap().scale, 0.5);
        let l = Lora::parse("c:/x.safetensors").unwrap();
        assert_eq!(
            (l.path.to_str().unwrap(), l.scale),
            ("c:/x.safetensors", 1.0)
        );
        assert!(Lora::parse("a:inf").is_err());
    }

    #[test]
    fn alpha_patterns_match_module_name_endings() {
        let config = AdapterConfig::from_metadata(
            r#"{"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"proj_out": 3, "^blocks.0.ffn.net.2": 1}}"#,
        )
        .unwrap();
        assert_eq!(config.alpha("proj_out"), 3.0);
        assert_eq!(config.alpha("blocks.0.ffn.net.2"), 1.0);
        assert_eq!(config.alpha("x.blocks.0.ffn.net.2"), 8.0);
        assert_eq!(config.alpha("blocks.0.attn1.to_q"), 8.0);
        assert!(
            AdapterConfig::from_metadata(r#"{"transformer.alpha_pattern": {"to_.*": 2}}"#).is_err()
        );
        assert!(AdapterConfig::from_metadata(r#"{"transformer.use_dora": true}"#).is_err());
    }
}
