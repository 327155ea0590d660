//! `config.json`, in both on-disk layouts: the flat one of the released
//! Qwen2.5-VL checkpoints (text fields at the top level, `rope_scaling` with
//! `mrope_section`, `vision_config.in_chans`) and the nested one transformers 5
//! writes (`text_config`, `vision_config`, `rope_parameters`).

use std::path::Path;

use serde_json::Value;

use crate::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub mrope_section: Vec<usize>,
    pub hidden_act: String,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub window_size: usize,
    pub out_hidden_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub rope_theta: f64,
    pub hidden_act: String,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tie_word_embeddings: bool,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub eos_token_ids: Vec<u32>,
}

struct Fields<'a> {
    path: &'a Path,
    layers: Vec<&'a Value>,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.layers
            .iter()
            .find_map(|v| v.get(key).filter(|x| !x.is_null()))
    }
    fn usize(&self, key: &str) -> Result<usize, Error> {
        self.usize_or(key, None)
    }
    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize, Error> {
        match self.get(key) {
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("{}.{key} is not a non-negative integer", self.what),
                )
            }),
            None => default
                .ok_or_else(|| Error::config(self.path, format!("{} has no `{key}`", self.what))),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, Error> {
        match self.get(key) {
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::config(self.path, format!("{}.{key} is not a number", self.what))
            }),
            None => Ok(default),
        }
    }
    fn str_or(&self, key: &str, default: &str) -> String {
        self.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_owned()
    }
}

fn usize_list(path: &Path, v: &Value, what: &str) -> Result<Vec<usize>, Error> {
    v.as_array()
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
        .ok_or_else(|| Error::config(path, format!("{what} is not a list of integers")))
}

fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl Config {
    /// Reads `dir/config.json` (and `dir/generation_config.json` for the stop tokens when present).
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let path = crate::checkpoint::CONFIG.path(dir);
        let value: Value = kubewan_model_common::read_json(&path, "a Qwen2.5-VL config")?;
        let mut cfg = Self::from_value(&path, &value)?;
        let gen_path = dir.join(crate::checkpoint::GENERATION_CONFIG);
        if gen_path.is_file() {
            let gen_cfg: Value = kubewan_model_common::read_json(&gen_path, "a generation config")?;
            let ids = id_list(gen_cfg.get("eos_token_id"));
            if !ids.is_empty() {
                cfg.eos_token_ids = ids;
            }
        }
        Ok(cfg)
    }

    pub fn from_value(path: &Path, root: &Value) -> Result<Self, Error> {
        if !root.is_object() {
            return Err(Error::config(path, "not a JSON object"));
        }
        let null = Value::Null;
        let text_v = root.get("text_config").unwrap_or(&null);
        // nested (transformers 5) first, flat (released) as fallback
        let t = Fields {
            path,
            layers: vec![text_v, root],
            what: "text config",
        };
        let rope = t
            .get("rope_parameters")
            .or_else(|| t.get("rope_scaling"))
            .unwrap_or(&null);
        let mrope_section = match rope.get("mrope_section") {
            Some(v) => usize_list(path, v, "mrope_section")?,
            None => vec![16, 24, 24],
        };
        let rope_theta = match rope.get("rope_theta").and_then(|v| v.as_f64()) {
            Some(x) => x,
            None => t.f64_or("rope_theta", 1_000_000.0)?,
        };
        let heads = t.usize("num_attention_heads")?;
        let text = TextConfig {
            vocab_size: t.usize("vocab_size")?,
            hidden_size: t.usize("hidden_size")?,
            intermediate_size: t.usize("intermediate_size")?,
            num_hidden_layers: t.usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: t.usize_or("num_key_value_heads", Some(heads))?,
            rms_norm_eps: t.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            mrope_section,
            hidden_act: t.str_or("hidden_act", "silu"),
        };
        let vision_v = root
            .get("vision_config")
            .ok_or_else(|| Error::config(path, "no `vision_config`"))?;
        let v = Fields {
            path,
            layers: vec![vision_v],
            what: "vision_config",
        };
        let vrope = v.get("rope_parameters").unwrap_or(&null);
        let vision = VisionConfig {
            depth: v.usize("depth")?,
            hidden_size: v.usize("hidden_size")?,
            intermediate_size: v.usize("intermediate_size")?,
            num_heads: v.usize("num_heads")?,
            in_channels: match v.get("in_channels") {
                Some(_) => v.usize("in_channels")?,
                None => v.usize_or("in_chans", Some(3))?,
            },
            patch_size: v.usize_or("patch_size", Some(14))?,
            spatial_merge_size: v.usize_or("spatial_merge_size", Some(2))?,
            temporal_patch_size: v.usize_or("temporal_patch_size", Some(2))?,
            window_size: v.usize_or("window_size", Some(112))?,
            out_hidden_size: v.usize_or("out_hidden_size", Some(text.hidden_size))?,
            fullatt_block_indexes: match v.get("fullatt_block_indexes") {
                Some(x) => usize_list(path, x, "vision_config.fullatt_block_indexes")?,
                None => vec![7, 15, 23, 31],
            },
            rope_theta: vrope
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10_000.0),
            hidden_act: v.str_or("hidden_act", "silu"),
        };
        let top = Fields {
            path,
            layers: vec![root, text_v],
            what: "config",
        };
        let tie_word_embeddings = top
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let id = |key: &str, default: usize| -> Result<u32, Error> {
            Ok(top.usize_or(key, Some(default))? as u32)
        };
        let cfg = Config {
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
            eos_token_ids: id_list(top.get("eos_token_id")),
            tie_word_embeddings,
            text,
            vision,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), Error> {
        let t = &self.text;
        let v = &self.vision;
        let bad = |m: String| Err(Error::config(path, m));
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if t.mrope_section.iter().sum::<usize>() * 2 != t.head_dim() {
            return bad(format!(
                "mrope_section {:?} does not add up to head_dim/2 = {}",
                t.mrope_section,
                t.head_dim() / 2
            ));
        }
        if v.num_heads == 0
            || !v.hidden_size.is_multiple_of(v.num_heads)
            || !v.head_dim().is_multiple_of(4)
        {
            return bad(format!(
                "vision hidden_size {} / num_heads {} must give a head_dim that is a multiple of 4",
                v.hidden_size, v.num_heads
            ));
        }
        if v.spatial_merge_size == 0
            || v.patch_size == 0
            || v.window_size < v.spatial_merge_size * v.patch_size
        {
            return bad(format!(
                "vision window_size {} is smaller than one merged cell ({}×{})",
                v.window_size, v.spatial_merge_size, v.patch_size
            ));
        }
        if v.out_hidden_size != t.hidden_size {
            return bad(format!(
                "vision out_hidden_size {} differs from the text hidden_size {}",
                v.out_hidden_size, t.hidden_size
            ));
        }
        for act in [&t.hidden_act, &v.hidden_act] {
            if act != "silu" {
                return bad(format!("unsupported activation {act:?} (only silu)"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    #[test]
    fn reads_the_released_flat_layout() {
        let c = Config::from_dir(&data("tiny-released-untied-gqa")).unwrap();
        assert_eq!(c.text.hidden_size, 48);
        assert_eq!(c.text.num_key_value_heads, 2);
        assert_eq!(c.text.mrope_section, vec![2, 2, 2]);
        assert_eq!(c.text.rope_theta, 1_000_000.0);
        assert_eq!(c.vision.in_channels, 3);
        assert_eq!(c.vision.fullatt_block_indexes, vec![2]);
        assert!(!c.tie_word_embeddings);
        // generation_config.json's two stop tokens win over config.json's one
        assert_eq!(c.eos_token_ids.len(), 2);
    }

    #[test]
    fn reads_the_transformers5_nested_layout() {
        let c = Config::from_dir(&data("tiny-v5-tied-gqa")).unwrap();
        assert_eq!(c.text.hidden_size, 32);
        assert_eq!(c.text.num_key_value_heads, 1);
        assert_eq!(c.text.mrope_section, vec![2, 1, 1]);
        assert_eq!(c.vision.window_size, 84);
        assert_eq!(c.vision.rope_theta, 10_000.0);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let p = Path::new("config.json");
        let mut v: Value = serde_json::from_str(
            &std::fs::read_to_string(data("tiny-released-untied-gqa").join("config.json")).unwrap(),
        )
        .unwrap();
        v["rope_scaling"]["mrope_section"] = serde_json::json!([4, 4, 4]);
        let e = Config::from_value(p, &v).unwrap_err().to_string();
        assert!(e.contains("mrope_section"), "{e}");
        v["rope_scaling"]["mrope_section"] = serde_json::json!([2, 2, 2]);
        v["num_key_value_heads"] = serde_json::json!(3);
        let e = Config::from_value(p, &v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        v.as_object_mut().unwrap().remove("vision_config");
        assert!(Config::from_value(p, &v).is_err());
    }
}
