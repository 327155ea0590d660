//! Prompt handling of `WanImageToVideoPipeline._get_t5_prompt_embeds`: clean the prompt, tokenize
//! it with the folder's `tokenizer/tokenizer.json` (T5-style: `</s>` appended), truncate and pad to
//! `max_sequence_length` (512), run UMT5 with the attention mask, and zero the embeddings past the
//! real length.

use std::path::Path;

use candle_core::Tensor;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::umt5::Umt5Encoder;
use crate::{Error, Result};

/// The pipeline's default (and Wan's trained) text length.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// Loads `dir/tokenizer.json` (the diffusers `tokenizer/` folder).
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::msg(format!(
            "{}: missing (the Rust side reads the fast-tokenizer file, not spiece.model)",
            path.display()
        )));
    }
    Tokenizer::from_file(&path)
        .map_err(|e| Error::msg(format!("{}: cannot load tokenizer: {e}", path.display())))
}

/// diffusers' `prompt_clean`: `html.unescape` twice, whitespace runs to one space, trimmed.
/// (`ftfy.fix_text` is not reproduced: it only changes mis-encoded text ("mojibake"), not clean
/// UTF-8.)
pub fn prompt_clean(text: &str) -> String {
    let once = html_unescape(text);
    let twice = html_unescape(&once);
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A subset of Python's `html.unescape`: the common named entities and numeric references.
pub fn html_unescape(s: &str) -> String {
    const NAMED: &[(&str, char)] = &[
        ("amp", '&'),
        ("lt", '<'),
        ("gt", '>'),
        ("quot", '"'),
        ("apos", '\''),
        ("nbsp", '\u{a0}'),
        ("copy", '\u{a9}'),
        ("reg", '\u{ae}'),
        ("hellip", '\u{2026}'),
        ("mdash", '\u{2014}'),
        ("ndash", '\u{2013}'),
        ("lsquo", '\u{2018}'),
        ("rsquo", '\u{2019}'),
        ("ldquo", '\u{201c}'),
        ("rdquo", '\u{201d}'),
        ("deg", '\u{b0}'),
        ("times", '\u{d7}'),
    ];
    const LEGACY: &[&str] = &[
        "amp", "lt", "gt", "quot", "nbsp", "copy", "reg", "deg", "times",
    ];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos + 1..];
        let mut consumed = None;
        if let Some(num) = tail.strip_prefix('#') {
            let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
                Some(hex) => (
                    hex.chars()
                        .take_while(|c| c.is_ascii_hexdigit())
                        .collect::<String>(),
                    16,
                    2,
                ),
                None => (
                    num.chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect::<String>(),
                    10,
                    1,
                ),
            };
            if !digits.is_empty()
                && let Some(c) = u32::from_str_radix(&digits, radix)
                    .ok()
                    .and_then(char::from_u32)
            {
                let mut len = skip + digits.len();
                if tail[len..].starts_with(';') {
                    len += 1;
                }
                out.push(c);
                consumed = Some(len);
            }
        } else {
            for (name, c) in NAMED {
                if let Some(after) = tail.strip_prefix(name)
                    && after.starts_with(';')
                {
                    out.push(*c);
                    consumed = Some(name.len() + 1);
                    break;
                }
            }
            // HTML5's legacy entities are also recognised without the semicolon ("&amp b", "&copy2024").
            if consumed.is_none() {
                for (name, c) in NAMED.iter().filter(|(n, _)| LEGACY.contains(n)) {
                    if tail.starts_with(name) {
                        out.push(*c);
                        consumed = Some(name.len());
                        break;
                    }
                }
            }
        }
        match consumed {
            Some(len) => rest = &tail[len..],
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A tokenized prompt: `ids` and `mask` of length `max_len`, `len` real tokens (`</s>` included).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    pub mask: Vec<u32>,
    pub len: usize,
}

/// Tokenizes `prompt` as the pipeline's tokenizer call does (`padding="max_length"`,
/// `truncation=True`, special tokens added). The text is used as given: [`encode_prompt`] cleans
/// it first with [`prompt_clean`], as the pipeline does.
pub fn tokenize(tokenizer: &Tokenizer, prompt: &str, max_len: usize) -> Result<TokenizedPrompt> {
    let pad_id = tokenizer.token_to_id("<pad>").unwrap_or(0);
    let mut tok = tokenizer.clone();
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| Error::msg(format!("tokenizer truncation: {e}")))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(max_len),
        direction: PaddingDirection::Right,
        pad_id,
        pad_token: tokenizer
            .id_to_token(pad_id)
            .unwrap_or_else(|| "<pad>".into()),
        ..Default::default()
    }));
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| Error::msg(format!("cannot tokenize the prompt: {e}")))?;
    let ids = enc.get_ids().to_vec();
    let mask = enc.get_attention_mask().to_vec();
    if ids.len() != max_len {
        return Err(Error::msg(format!(
            "tokenizer returned {} ids, expected {max_len}",
            ids.len()
        )));
    }
    let len = mask.iter().filter(|&&m| m > 0).count();
    Ok(TokenizedPrompt { ids, mask, len })
}

/// The pipeline's prompt embeddings: the prompt cleaned ([`prompt_clean`]), tokenized, encoded;
/// [1, max_len, d_model] in the encoder's dtype, rows past the prompt's real length set to zero.
pub fn encode_prompt(
    tokenizer: &Tokenizer,
    encoder: &Umt5Encoder,
    prompt: &str,
    max_len: usize,
) -> Result<Tensor> {
    let t = tokenize(tokenizer, &prompt_clean(prompt), max_len)?;
    let device = encoder.device();
    let ids = Tensor::from_vec(t.ids.clone(), (1, max_len), device)?;
    let mask = Tensor::from_vec(t.mask.clone(), (1, max_len), device)?;
    let hidden = encoder.encode(&ids, Some(&mask))?;
    let d = hidden.dim(2)?;
    let kept = hidden.narrow(1, 0, t.len)?;
    if t.len == max_len {
        return Ok(kept);
    }
    let zeros = Tensor::zeros((1, max_len - t.len, d), hidden.dtype(), device)?;
    Ok(Tensor::cat(&[&kept, &zeros], 1)?)
}
