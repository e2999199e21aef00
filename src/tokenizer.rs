//! CLIP's tokenizer, as transformers' `CLIPTokenizer` runs it for Stable Diffusion: byte-level BPE
//! with the `</w>` end-of-word suffix, the prompt wrapped in start and end tokens and padded to the
//! model's 77 positions; plus the map from a prompt's words to the positions of their tokens,
//! which map capture needs (SPEC section 3).
//!
//! A diffusers `tokenizer/` folder holds either a `tokenizer.json` (loaded as is) or only
//! `vocab.json` + `merges.txt`, from which we build the same pipeline transformers builds
//! (normalizer NFC, collapsed whitespace, lowercase; CLIP's regex split, then byte-level; BPE).
//! The special tokens and the length come from `tokenizer_config.json` and
//! `special_tokens_map.json`. They matter: SD2.1 pads with "!" (id 0), CLIP-L with the end token.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{Error, Result};

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`): the two special tokens whole,
/// English contractions, runs of letters, single digits, runs of other non-space characters.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's context length, used when the config does not state one.
const DEFAULT_MAX_LENGTH: usize = 77;

/// A tokenizer for one CLIP text encoder.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

/// A prompt, tokenized as the text encoder reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoding {
    /// `max_length` ids: the start token, the prompt's tokens, the end token, then pad tokens.
    pub ids: Vec<u32>,
    /// How many leading ids are not padding (start + prompt tokens + end).
    pub len: usize,
    /// Whether tokens were dropped to fit `max_length`.
    pub truncated: bool,
    /// The prompt's words (as CLIP's pre-tokenizer splits them) that fit entirely, in order.
    pub words: Vec<Word>,
}

/// One word of a prompt and where its tokens are.
#[derive(Clone, Debug, PartialEq)]
pub struct Word {
    /// The word as written in the prompt.
    pub text: String,
    /// Its byte range in the prompt.
    pub span: Range<usize>,
    /// The positions of its tokens in [`Encoding::ids`] (after the start token, so from 1).
    pub tokens: Range<usize>,
}

/// The special tokens and length that the config files set.
struct Settings {
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
    max_length: usize,
}

impl Tokenizer {
    /// Load a diffusers `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`; special tokens and length from `tokenizer_config.json` and
    /// `special_tokens_map.json` (both optional; CLIP's defaults otherwise).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::format(&dir, "tokenizer folder not found"));
        }
        let settings = read_settings(&dir)?;
        let json = dir.join("tokenizer.json");
        let mut inner = if json.exists() {
            tokenizers::Tokenizer::from_file(&json)
                .map_err(|e| Error::format(&json, format!("invalid tokenizer: {e}")))?
        } else {
            build_clip_bpe(&dir, &settings.unk)?
        };
        // Truncation and padding are ours (`encode`); a tokenizer.json may carry its own.
        inner
            .with_truncation(None)
            .map_err(|e| Error::format(&json, e.to_string()))?;
        inner.with_padding(None);
        // transformers registers the configured special tokens on top of whatever the backend
        // has; this is what makes SD2.1's pad token "!" match as one token anywhere in a prompt.
        // Tokens the backend already has are left as they are.
        inner
            .add_special_tokens(
                [&settings.bos, &settings.eos, &settings.unk, &settings.pad].map(|t| t.clone()),
            )
            .map_err(|e| Error::format(&dir, format!("cannot add special tokens: {e}")))?;
        let id = |t: &AddedToken, role: &str| {
            inner.token_to_id(&t.content).ok_or_else(|| {
                Error::format(
                    &dir,
                    format!("{role} token {:?} is not in the vocabulary", t.content),
                )
            })
        };
        let (bos_id, eos_id, pad_id) = (
            id(&settings.bos, "bos")?,
            id(&settings.eos, "eos")?,
            id(&settings.pad, "pad")?,
        );
        Ok(Tokenizer {
            inner,
            dir,
            bos_id,
            eos_id,
            pad_id,
            max_length: settings.max_length,
        })
    }

    /// The length of every encoding (77 for CLIP), start and end tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenize `prompt` as diffusers' pipelines do (`padding="max_length"`, `truncation=True`):
    /// `[bos, tokens.., eos, pad..]`, `max_length` ids. A prompt that does not fit is cut to
    /// `max_length - 2` tokens, with a warning on stderr naming what was dropped.
    pub fn encode(&self, prompt: &str) -> Result<Encoding> {
        let raw = self
            .inner
            .encode(prompt, false)
            .map_err(|e| self.error(prompt, e))?;
        let ids = raw.get_ids();
        let keep = ids.len().min(self.max_length - 2);
        if keep < ids.len() {
            let at = raw.get_offsets()[keep].0;
            eprintln!(
                "warning: the prompt is longer than the text encoder's {} tokens; ignoring {:?}",
                self.max_length,
                prompt.get(at..).unwrap_or_default()
            );
        }
        let mut out = Vec::with_capacity(self.max_length);
        out.push(self.bos_id);
        out.extend_from_slice(&ids[..keep]);
        out.push(self.eos_id);
        let len = out.len();
        out.resize(self.max_length, self.pad_id);
        let words = group_words(prompt, &raw)
            .into_iter()
            .filter(|w| w.tokens.end <= keep + 1)
            .collect();
        Ok(Encoding {
            ids: out,
            len,
            truncated: keep < ids.len(),
            words,
        })
    }

    /// The positions in the encoding (start token at 0) of the tokens of the first occurrence of
    /// `word` in `prompt`. `word` may be several words ("teddy bear") and each may be several
    /// tokens; words are compared whole and after normalisation (case and spacing do not
    /// matter), so "bear" is not found in "teddybear". An error names the word when it is not in
    /// the prompt, or only past the length limit.
    pub fn word_token_indices(&self, prompt: &str, word: &str) -> Result<Vec<usize>> {
        let query = self.words_of(word)?;
        if query.is_empty() {
            return Err(Error::Invalid(format!(
                "capture word {word:?} has no tokens"
            )));
        }
        let words = self.words_of(prompt)?;
        let found = words
            .windows(query.len())
            .position(|w| w.iter().zip(&query).all(|(a, b)| a.1 == b.1));
        let Some(first) = found else {
            return Err(Error::Invalid(format!(
                "capture word {word:?} is not in the prompt {prompt:?}"
            )));
        };
        let positions: Vec<usize> = words[first..first + query.len()]
            .iter()
            .flat_map(|(w, _)| w.tokens.clone())
            .collect();
        // Positions 1..=max_length-2 hold the prompt's tokens; later ones were truncated.
        if positions.iter().any(|&p| p > self.max_length - 2) {
            return Err(Error::Invalid(format!(
                "capture word {word:?} comes after the text encoder's {}-token limit in the prompt {prompt:?}",
                self.max_length
            )));
        }
        Ok(positions)
    }

    /// The words of `text` with the ids of their tokens (untruncated; positions as in an encoding).
    fn words_of(&self, text: &str) -> Result<Vec<(Word, Vec<u32>)>> {
        let raw = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error(text, e))?;
        let ids = raw.get_ids();
        Ok(group_words(text, &raw)
            .into_iter()
            .map(|w| {
                let word_ids = ids[w.tokens.start - 1..w.tokens.end - 1].to_vec();
                (w, word_ids)
            })
            .collect())
    }

    fn error(&self, text: &str, e: tokenizers::Error) -> Error {
        Error::Invalid(format!(
            "tokenizer {}: cannot encode {text:?}: {e}",
            self.dir.display()
        ))
    }
}

/// Consecutive tokens with the same word id form a word (the pre-tokenizer's split); its span
/// runs from its first token's start offset to its last token's end offset. Positions are shifted
/// by one for the start token.
fn group_words(text: &str, raw: &tokenizers::Encoding) -> Vec<Word> {
    let (word_ids, offsets) = (raw.get_word_ids(), raw.get_offsets());
    let mut words: Vec<(Option<u32>, Word)> = Vec::new();
    for (i, (&wid, &(s, e))) in word_ids.iter().zip(offsets).enumerate() {
        match words.last_mut() {
            Some((last, w)) if wid.is_some() && *last == wid => {
                w.tokens.end = i + 2;
                w.span.end = w.span.end.max(e);
            }
            _ => words.push((
                wid,
                Word {
                    text: String::new(),
                    span: s..e,
                    tokens: i + 1..i + 2,
                },
            )),
        }
    }
    words
        .into_iter()
        .map(|(_, mut w)| {
            w.text = text.get(w.span.clone()).unwrap_or_default().to_string();
            w
        })
        .collect()
}

/// CLIP's fast tokenizer from `vocab.json` + `merges.txt`, as transformers' `CLIPTokenizer`
/// builds it.
fn build_clip_bpe(dir: &Path, unk: &AddedToken) -> Result<tokenizers::Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab: HashMap<String, u32> = serde_json::from_str(&read(&vocab_path)?).map_err(|e| {
        Error::format(
            &vocab_path,
            format!("expected a JSON object of token ids: {e}"),
        )
    })?;
    let vocab: Vocab = vocab.into_iter().collect();
    let mut merges = Vec::new();
    // The first line is a `#version` header; blank lines carry nothing.
    for (n, line) in read(&merges_path)?.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with("#version") {
            continue;
        }
        let Some((a, b)) = line.split_once(' ') else {
            return Err(Error::format(
                &merges_path,
                format!("line {}: expected two tokens: {line:?}", n + 1),
            ));
        };
        merges.push((a.to_string(), b.to_string()));
    }
    let fmt = |path: &Path, e: tokenizers::Error| Error::format(path, e.to_string());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.content.clone())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .build()
        .map_err(|e| fmt(&merges_path, e))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let normalizer = NormalizerSequence::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| fmt(dir, e))?
        .into(),
        Lowercase.into(),
    ]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| fmt(dir, e))?;
    let pre =
        PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    tok.with_normalizer(Some(normalizer))
        .map_err(|e| fmt(dir, e))?;
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// Special tokens and length, merged as transformers merges them: `tokenizer_config.json`, then
/// (for configs without `added_tokens_decoder`, the legacy layout SD2.1 ships)
/// `special_tokens_map.json` on top, then CLIPTokenizer's defaults.
fn read_settings(dir: &Path) -> Result<Settings> {
    let config_path = dir.join("tokenizer_config.json");
    let map_path = dir.join("special_tokens_map.json");
    let config = read_json_object(&config_path)?;
    let mut merged = config.clone();
    if !config.contains_key("added_tokens_decoder") {
        merged.extend(read_json_object(&map_path)?);
    }
    let token = |key: &str, default: &str| -> Result<AddedToken> {
        match merged.get(key) {
            None | Some(Value::Null) => Ok(AddedToken::from(default, true)),
            Some(v) => added_token(v).ok_or_else(|| {
                Error::format(
                    &config_path,
                    format!("`{key}`: expected a string or an object with `content`, got {v}"),
                )
            }),
        }
    };
    // transformers writes a huge number (int(1e30)) when the length is unknown.
    let max_length = match merged.get("model_max_length").and_then(Value::as_f64) {
        Some(n) if (3.0..1e6).contains(&n) => n as usize,
        _ => DEFAULT_MAX_LENGTH,
    };
    Ok(Settings {
        bos: token("bos_token", "<|startoftext|>")?,
        eos: token("eos_token", "<|endoftext|>")?,
        unk: token("unk_token", "<|endoftext|>")?,
        pad: token("pad_token", "<|endoftext|>")?,
        max_length,
    })
}

/// A special token as the configs write it: a string, or an object with `content` and the
/// matching flags (`normalized` decides whether it is matched before or after lowercasing).
fn added_token(v: &Value) -> Option<AddedToken> {
    match v {
        Value::String(s) => Some(AddedToken::from(s.clone(), true)),
        Value::Object(o) => {
            let flag = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
            let t = AddedToken::from(o.get("content")?.as_str()?.to_string(), true)
                .single_word(flag("single_word"))
                .lstrip(flag("lstrip"))
                .rstrip(flag("rstrip"))
                .normalized(flag("normalized"));
            Some(t)
        }
        _ => None,
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// A JSON object from `path`; an absent file reads as empty.
fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    if !path.exists() {
        return Ok(Default::default());
    }
    match serde_json::from_str(&read(path)?) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::format(path, "expected a JSON object")),
        Err(e) => Err(Error::format(path, format!("invalid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_token_reads_both_forms() {
        let s = added_token(&serde_json::json!("!")).unwrap();
        assert_eq!(
            (s.content.as_str(), s.normalized, s.special),
            ("!", false, true)
        );
        let o = added_token(&serde_json::json!({"content": "<|endoftext|>", "normalized": true}))
            .unwrap();
        assert_eq!((o.content.as_str(), o.normalized), ("<|endoftext|>", true));
        assert!(added_token(&serde_json::json!(3)).is_none());
    }
}
