//! The model folder's chat template (`chat_template.json`, `chat_template.jinja`
//! or `tokenizer_config.json`'s `chat_template`) rendered with minijinja the
//! way transformers renders it (trim_blocks, lstrip_blocks), and `tokenizer.json`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::Error;

pub fn load_template(dir: &Path) -> Result<(PathBuf, String), Error> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok((jinja, text));
    }
    for (name, what) in [
        ("chat_template.json", "a chat template"),
        ("tokenizer_config.json", "a tokenizer config"),
    ] {
        let path = dir.join(name);
        if path.is_file() {
            let v: Value = kubewan_model_common::read_json(&path, what)?;
            if let Some(t) = v.get("chat_template") {
                if let Some(s) = t.as_str() {
                    return Ok((path, s.to_owned()));
                }
                // a list of named templates: take "default"
                if let Some(list) = t.as_array() {
                    for item in list {
                        if item.get("name").and_then(|n| n.as_str()) == Some("default")
                            && let Some(s) = item.get("template").and_then(|s| s.as_str())
                        {
                            return Ok((path, s.to_owned()));
                        }
                    }
                }
            }
        }
    }
    Err(Error::MissingFiles {
        dir: dir.to_owned(),
        missing: vec![
            "a chat template (chat_template.jinja, chat_template.json or tokenizer_config.json:chat_template)"
                .into(),
        ],
    })
}

/// Renders one (optional) system message and one user message holding `n_images`
/// images in order, then `prompt`, with the generation prompt appended.
pub fn render(
    template: &str,
    system: Option<&str>,
    n_images: usize,
    prompt: &str,
) -> Result<String, Error> {
    let mut env = minijinja::Environment::new();
    let syntax = env
        .syntax()
        .to_builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::Template(e.to_string()))?;
    env.set_syntax(syntax);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::Template(e.to_string()))?;
    let mut content: Vec<Value> = (0..n_images).map(|_| json!({"type": "image"})).collect();
    content.push(json!({"type": "text", "text": prompt}));
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": content}));
    let messages = to_jinja(&Value::Array(messages));
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
    })
    .map_err(|e| Error::Template(format!("{e:#}")))
}

/// serde_json -> minijinja value (the workspace builds minijinja without its serde feature).
fn to_jinja(v: &Value) -> minijinja::Value {
    use minijinja::Value as J;
    match v {
        Value::Null => J::from(()),
        Value::Bool(b) => J::from(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => J::from(i),
            None => J::from(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => J::from(s.as_str()),
        Value::Array(a) => J::from(a.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(o) => J::from(
            o.iter()
                .map(|(k, v)| (k.clone(), to_jinja(v)))
                .collect::<std::collections::BTreeMap<String, J>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_qwen_template() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-released-untied-gqa");
        let (_, t) = load_template(&dir).unwrap();
        let s = render(&t, None, 2, "Hi there.").unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>\
             Hi there.<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = render(&t, Some("Be brief."), 0, "Go").unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
