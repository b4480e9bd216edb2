//! Text tokenisation through HF `tokenizer.json` (the `tokenizers` crate), with truncation to the
//! model's context that keeps the end-of-text token (special tokens are added after truncating,
//! as transformers does) and right padding to the longest text of the batch.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// The OpenAI CLIP BPE (49408 tokens) as `tokenizer.json`, made by tools/make_clip_tokenizer.py
/// from open_clip's `bpe_simple_vocab_16e6.txt.gz`.
pub const CLIP_TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/clip/tokenizer.json");

/// A padded batch of token ids with its attention mask (1 = real token, 0 = padding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
}

impl TokenBatch {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn seq_len(&self) -> usize {
        self.ids.first().map_or(0, |r| r.len())
    }
}

/// A tokenizer bound to a model's context length.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    context: usize,
    pad_id: u32,
    origin: PathBuf,
    /// The `tokenizer.json` this was read from, to copy into model directories we write.
    json: Vec<u8>,
}

/// A tokenised batch plus which inputs were cut to fit the context.
pub struct Encoded {
    pub batch: TokenBatch,
    pub truncated: Vec<bool>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; the pad token comes from a sibling `tokenizer_config.json` when
    /// it names one, else `<|endoftext|>` (CLIP's), `[PAD]` (BERT's), or id 0.
    pub fn from_file(path: &Path, context: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let pad_name = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .filter(|p| p.is_file())
            .map(|p| crate::io::read_json::<serde_json::Value>(&p))
            .transpose()?
            .and_then(|cfg| match cfg.get("pad_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
                None => None,
            });
        Self::from_bytes(&bytes, path, context, pad_name.as_deref())
    }

    /// A tokenizer from `tokenizer.json` bytes (e.g. one rebuilt from a GGUF's metadata);
    /// `origin` names it in errors.
    pub fn from_json_bytes(bytes: &[u8], origin: &Path, context: usize) -> Result<Self> {
        Self::from_bytes(bytes, origin, context, None)
    }

    /// The bundled CLIP tokenizer.
    pub fn bundled_clip(context: usize) -> Result<Self> {
        Self::from_bytes(
            CLIP_TOKENIZER_JSON,
            Path::new("<bundled CLIP tokenizer>"),
            context,
            None,
        )
    }

    fn from_bytes(bytes: &[u8], origin: &Path, context: usize, pad: Option<&str>) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer {
            path: origin.to_path_buf(),
            msg,
        };
        let mut inner = Tokenizer::from_bytes(bytes).map_err(|e| err(e.to_string()))?;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: context,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| err(e.to_string()))?;
        inner.with_padding(None);
        let pad_id = pad
            .into_iter()
            .chain(["<|endoftext|>", "[PAD]", "<pad>"])
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(0);
        Ok(Self {
            inner,
            context,
            pad_id,
            origin: origin.to_path_buf(),
            json: bytes.to_vec(),
        })
    }

    /// The `tokenizer.json` bytes this tokenizer was read from.
    pub fn json_bytes(&self) -> &[u8] {
        &self.json
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokenises with special tokens, truncates to the context, pads to the longest.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Encoded> {
        let mut ids = Vec::with_capacity(texts.len());
        let mut truncated = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self
                .inner
                .encode(t.as_ref(), true)
                .map_err(|e| Error::Tokenizer {
                    path: self.origin.clone(),
                    msg: format!("cannot encode {:?}: {e}", t.as_ref()),
                })?;
            truncated.push(!enc.get_overflowing().is_empty());
            ids.push(enc.get_ids().to_vec());
        }
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mask = ids
            .iter()
            .map(|r| (0..longest).map(|i| u32::from(i < r.len())).collect())
            .collect();
        for r in &mut ids {
            r.resize(longest, self.pad_id);
        }
        Ok(Encoded {
            batch: TokenBatch { ids, mask },
            truncated,
        })
    }

    /// Decodes ids back to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.origin.clone(),
            msg: e.to_string(),
        })
    }
}

/// Special tokens of the word-level tokenizers vlalign builds, with their ids. The end-of-text
/// id is not 2, so transformers pools CLIP text at the first end-of-text token (its legacy rule
/// for `eos_token_id == 2` would take the argmax id instead).
pub const WORD_LEVEL_SPECIALS: [&str; 4] =
    ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"];

/// A `tokenizer.json` for a word-level vocabulary (lower-cased, split on whitespace and
/// punctuation, wrapped in start/end-of-text): ids 0 pad, 1 unk, 2 start, 3 end, then `words`.
/// Loads in the `tokenizers` crate and in transformers' `PreTrainedTokenizerFast`.
pub fn word_level_tokenizer_json(words: &[String]) -> serde_json::Value {
    use serde_json::json;
    let mut vocab = serde_json::Map::new();
    for (i, t) in WORD_LEVEL_SPECIALS.iter().enumerate() {
        vocab.insert((*t).into(), i.into());
    }
    for w in words {
        if !vocab.contains_key(w.as_str()) {
            let id = vocab.len();
            vocab.insert(w.clone(), id.into());
        }
    }
    let added: Vec<_> = WORD_LEVEL_SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
    let (bos, eos) = (WORD_LEVEL_SPECIALS[2], WORD_LEVEL_SPECIALS[3]);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(bos), seq("A"), special(eos)],
            "pair": [special(bos), seq("A"), special(eos), seq("B"), special(eos)],
            "special_tokens": {
                bos: {"id": bos, "ids": [2], "tokens": [bos]},
                eos: {"id": eos, "ids": [3], "tokens": [eos]},
            },
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": WORD_LEVEL_SPECIALS[1]},
    })
}

/// The `tokenizer_config.json` transformers needs to load a word-level tokenizer.json.
pub fn word_level_tokenizer_config(context: usize) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": WORD_LEVEL_SPECIALS[0],
        "unk_token": WORD_LEVEL_SPECIALS[1],
        "bos_token": WORD_LEVEL_SPECIALS[2],
        "eos_token": WORD_LEVEL_SPECIALS[3],
        "model_max_length": context,
    })
}

impl TextTokenizer {
    /// A word-level tokenizer over `words` (see [`word_level_tokenizer_json`]).
    pub fn word_level(words: &[String], context: usize) -> Result<Self> {
        let json = word_level_tokenizer_json(words).to_string();
        Self::from_bytes(
            json.as_bytes(),
            Path::new("<word-level tokenizer>"),
            context,
            Some(WORD_LEVEL_SPECIALS[0]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_level_ids_and_specials() {
        let words: Vec<String> = ["a", "red", "circle", ":"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let tok = TextTokenizer::word_level(&words, 8).unwrap();
        let enc = tok.encode(&["A Red circle: zebra", "red"]).unwrap();
        // 2 = start, 4.. = words in order, 1 = unknown, 3 = end, 0 = pad.
        assert_eq!(enc.batch.ids[0], [2, 4, 5, 6, 7, 1, 3]);
        assert_eq!(enc.batch.ids[1], [2, 5, 3, 0, 0, 0, 0]);
        let long = "red ".repeat(20);
        let enc = tok.encode(&[long.as_str()]).unwrap();
        assert_eq!(enc.batch.ids[0], [2, 5, 5, 5, 5, 5, 5, 3]);
        assert!(enc.truncated[0]);
    }
}
