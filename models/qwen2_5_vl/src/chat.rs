//! The model folder's chat template (`chat_template.jinja`, `chat_template.json`
//! or `tokenizer_config.json`'s `chat_template`, see
//! [`crate::checkpoint::CHAT_TEMPLATE`]) rendered with minijinja the way
//! transformers renders it (trim_blocks, lstrip_blocks).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::Error;
use crate::checkpoint::CHAT_TEMPLATE;

/// The chat template of `dir` and the file it came from: the first of
/// [`CHAT_TEMPLATE`]'s files that holds one (a `.jinja` file is the template
/// itself; the JSON files hold it under `chat_template`, as a string or as a
/// list of named templates of which "default" is taken).
pub fn load_template(dir: &Path) -> Result<(PathBuf, String), Error> {
    for name in CHAT_TEMPLATE.names {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if path.extension().is_some_and(|e| e == "jinja") {
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            return Ok((path, text));
        }
        let v: Value = kubewan_model_common::read_json(&path, "a JSON file with a chat template")?;
        if let Some(template) = template_in(&v) {
            return Ok((path, template));
        }
    }
    Err(Error::Template(format!(
        "{}: no chat template in any of {}",
        dir.display(),
        CHAT_TEMPLATE.names.join(", ")
    )))
}

/// `chat_template` of a JSON document: a string, or the "default" of a list of named templates.
fn template_in(v: &Value) -> Option<String> {
    let t = v.get("chat_template")?;
    if let Some(s) = t.as_str() {
        return Some(s.to_owned());
    }
    t.as_array()?
        .iter()
        .find(|item| item.get("name").and_then(Value::as_str) == Some("default"))
        .and_then(|item| item.get("template")?.as_str())
        .map(str::to_owned)
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
