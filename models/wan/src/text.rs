//! Prompt handling of `WanImageToVideoPipeline._get_t5_prompt_embeds`: clean the prompt, tokenize
//! it with the folder's `tokenizer/tokenizer.json` (T5-style: `</s>` appended), truncate and pad to
//! `max_sequence_length` (512), run UMT5 with the attention mask, and zero the embeddings past the
//! real length.

use std::path::Path;

use candle_core::Tensor;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::umt5::Umt5Encoder;
use crate::{Error, Result, checkpoint};

/// The pipeline's default (and Wan's trained) text length.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// Loads the fast tokenizer of the diffusers `tokenizer/` folder `dir`.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = checkpoint::TOKENIZER.path(dir);
    if !path.is_file() {
        return Err(Error::msg(format!(
            "{}: missing (the Rust side reads the fast-tokenizer file, not spiece.model)",
            path.display()
        )));
    }
    Tokenizer::from_file(&path)
        .map_err(|e| Error::msg(format!("{}: cannot load tokenizer: {e}", path.display())))
}

/// diffusers' `prompt_clean`: `ftfy.fix_text` (see [`fix_text`]), `html.unescape` twice,
/// whitespace runs to one space, trimmed.
pub fn prompt_clean(text: &str) -> String {
    let fixed = fix_text(text);
    let once = html_unescape(&fixed);
    let twice = html_unescape(&once);
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The deterministic part of `ftfy.fix_text` with its default settings, repeated until nothing
/// changes as ftfy does: HTML entities (when the text has no `<`), C1 controls read as
/// Windows-1252, Latin ligatures, fullwidth ASCII and the ideographic space, curly quotes to
/// straight ones, ANSI terminal escapes and invisible control characters removed.
///
/// Not reproduced: ftfy's heuristic mojibake repair (`fix_encoding`), its NFC normalisation and
/// the halfwidth-katakana width fixes. The UMT5 tokenizer normalises NFKC itself, which covers the
/// latter two; mojibake only occurs in text that was mis-decoded before it reached us.
pub fn fix_text(text: &str) -> String {
    let mut cur = text.to_string();
    for _ in 0..16 {
        let orig = cur.clone();
        if !cur.contains('<') {
            cur = html_unescape(&cur);
        }
        let mut out = String::with_capacity(cur.len());
        for c in cur.chars() {
            let c = match c as u32 {
                0x80..=0x9f => cp1252(c as u32),
                _ => c,
            };
            match c {
                '\u{0132}' => out.push_str("IJ"),
                '\u{0133}' => out.push_str("ij"),
                '\u{0149}' => out.push_str("\u{2bc}n"),
                '\u{01f1}' => out.push_str("DZ"),
                '\u{01f2}' => out.push_str("Dz"),
                '\u{01f3}' => out.push_str("dz"),
                '\u{01c4}' => out.push_str("D\u{17d}"),
                '\u{01c5}' => out.push_str("D\u{17e}"),
                '\u{01c6}' => out.push_str("d\u{17e}"),
                '\u{01c7}' => out.push_str("LJ"),
                '\u{01c8}' => out.push_str("Lj"),
                '\u{01c9}' => out.push_str("lj"),
                '\u{01ca}' => out.push_str("NJ"),
                '\u{01cb}' => out.push_str("Nj"),
                '\u{01cc}' => out.push_str("nj"),
                '\u{fb00}' => out.push_str("ff"),
                '\u{fb01}' => out.push_str("fi"),
                '\u{fb02}' => out.push_str("fl"),
                '\u{fb03}' => out.push_str("ffi"),
                '\u{fb04}' => out.push_str("ffl"),
                '\u{fb05}' => out.push_str("\u{17f}t"),
                '\u{fb06}' => out.push_str("st"),
                '\u{3000}' => out.push(' '),
                '\u{ff01}'..='\u{ff5e}' => {
                    out.push(char::from_u32(c as u32 - 0xff01 + 0x21).expect("ASCII"))
                }
                '\u{2bc}' | '\u{2018}'..='\u{201b}' => out.push('\''),
                '\u{201c}'..='\u{201f}' => out.push('"'),
                _ => out.push(c),
            }
        }
        let out = remove_ansi_escapes(&out);
        cur = out.chars().filter(|&c| !is_ftfy_control(c)).collect();
        if cur == orig {
            break;
        }
    }
    cur
}

/// Windows-1252's reading of a C1 control code point (undefined bytes stay as they are).
fn cp1252(b: u32) -> char {
    const TABLE: [u32; 32] = [
        0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039,
        0x152, 0x8d, 0x17d, 0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014,
        0x2dc, 0x2122, 0x161, 0x203a, 0x153, 0x9d, 0x17e, 0x178,
    ];
    char::from_u32(TABLE[(b - 0x80) as usize]).expect("valid code point")
}

/// ftfy's `remove_control_chars` set.
fn is_ftfy_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
}

/// Removes `ESC [ (digits|;)* letter` sequences.
fn remove_ansi_escapes(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\u{1b}' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';') {
                j += 1;
            }
            if j < chars.len() && chars[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
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
