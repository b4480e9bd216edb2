//! Configurations of the decoder LMs, deserialised from HF `config.json` (transformers'
//! configuration_opt.py, configuration_llama.py, configuration_qwen2.py). Missing keys take
//! transformers' defaults; every size is bounded before it sizes an allocation, and options we
//! do not implement (rotary scaling, sliding windows) are refused by name rather than ignored.

use serde::{Deserialize, Serialize};

use crate::nn::Activation;

/// Largest accepted vocabulary, width, layer count, heads and positions: far above any model
/// vlalign can run, low enough that a corrupt config cannot ask for terabytes.
const MAX_VOCAB: usize = 1 << 20;
const MAX_WIDTH: usize = 1 << 16;
const MAX_LAYERS: usize = 1024;
const MAX_POSITIONS: usize = 1 << 20;

/// `OPTConfig` (Zhang et al. 2022; BLIP-2's OPT-2.7B/6.7B LMs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// Pre-LN when true (OPT-125m, 1.3b, 2.7b, ...); post-LN for opt-350m.
    pub do_layer_norm_before: bool,
    /// Width of the token embeddings; `project_in`/`project_out` map it to `hidden_size` when
    /// they differ (opt-350m).
    pub word_embed_proj_dim: usize,
    pub activation_function: Activation,
    pub enable_bias: bool,
    pub layer_norm_elementwise_affine: bool,
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// One id or a list (Llama 3 stops on either of two); `null` is none.
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
}

impl Default for OptConfig {
    fn default() -> Self {
        Self {
            vocab_size: 50272,
            hidden_size: 768,
            num_hidden_layers: 12,
            ffn_dim: 3072,
            num_attention_heads: 12,
            max_position_embeddings: 2048,
            do_layer_norm_before: true,
            word_embed_proj_dim: 768,
            activation_function: Activation::Relu,
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            remove_final_layer_norm: false,
            tie_word_embeddings: true,
            pad_token_id: Some(1),
            bos_token_id: Some(2),
            eos_token_id: vec![2],
        }
    }
}

/// `LlamaConfig`, also read for `qwen2` (Llama with q/k/v biases) and SmolLM2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: query head h reads key/value head h / (heads / kv_heads).
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// Filled from `rope_theta` or `rope_parameters.rope_theta` by [`LlamaConfig::from_json`].
    #[serde(skip_deserializing)]
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Llama: a bias on q, k, v and o. Qwen2 has q/k/v biases always ([`LlamaConfig::qkv_bias`]).
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// True for `model_type = "qwen2"`.
    #[serde(skip)]
    pub qwen2: bool,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// One id or a list (Llama 3 stops on either of two); `null` is none.
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: Activation::Silu,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            qwen2: false,
            pad_token_id: None,
            bos_token_id: Some(1),
            eos_token_id: vec![2],
        }
    }
}

impl LlamaConfig {
    /// Reads a Llama or Qwen2 `config.json`: rotary settings from either transformers 4's
    /// `rope_theta` / `rope_scaling` or transformers 5's `rope_parameters`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let mut cfg: LlamaConfig = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        cfg.qwen2 = v.get("model_type").and_then(|m| m.as_str()) == Some("qwen2");
        if cfg.qwen2 && v.get("tie_word_embeddings").is_none() {
            cfg.tie_word_embeddings = false;
        }
        let params = v.get("rope_parameters");
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .map(|t| t.as_f64().ok_or("rope_theta must be a number"))
            .transpose()?;
        cfg.rope_theta = theta.unwrap_or(10000.0);
        let kind = params
            .and_then(|p| p.get("rope_type"))
            .or_else(|| v.get("rope_scaling").and_then(|s| s.get("rope_type")))
            .or_else(|| v.get("rope_scaling").and_then(|s| s.get("type")))
            .and_then(|t| t.as_str());
        if let Some(k) = kind.filter(|k| *k != "default") {
            return Err(format!(
                "rotary scaling `{k}` is not supported (only the default rotary embedding)"
            ));
        }
        if cfg.qwen2 && v.get("use_sliding_window").and_then(|s| s.as_bool()) == Some(true) {
            return Err("use_sliding_window = true is not supported".into());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q, k and v carry biases (Qwen2 always; Llama with `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.qwen2 || self.attention_bias
    }

    /// Whether the output projection carries a bias (Llama with `attention_bias`; never Qwen2).
    pub fn o_bias(&self) -> bool {
        !self.qwen2 && self.attention_bias
    }

    pub fn validate(&self) -> Result<(), String> {
        bounded("vocab_size", self.vocab_size, MAX_VOCAB)?;
        bounded("hidden_size", self.hidden_size, MAX_WIDTH)?;
        bounded("intermediate_size", self.intermediate_size, MAX_WIDTH * 4)?;
        bounded("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        bounded("num_attention_heads", self.num_attention_heads, MAX_WIDTH)?;
        bounded(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || hd % 2 == 1 || hd > MAX_WIDTH {
            return Err(format!("head_dim ({hd}) must be a positive even number"));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!(
                "rms_norm_eps ({}) must be a small positive number (e.g. 1e-5)",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(format!(
                "rope_theta ({}) must be a number above 1",
                self.rope_theta
            ));
        }
        Ok(())
    }
}

impl OptConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.layer_norm_elementwise_affine {
            return Err("layer_norm_elementwise_affine = false is not supported".into());
        }
        bounded("vocab_size", self.vocab_size, MAX_VOCAB)?;
        bounded("hidden_size", self.hidden_size, MAX_WIDTH)?;
        bounded("ffn_dim", self.ffn_dim, MAX_WIDTH * 4)?;
        bounded("word_embed_proj_dim", self.word_embed_proj_dim, MAX_WIDTH)?;
        bounded(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        crate::models::clip::config::validate_tower(
            "config",
            self.hidden_size,
            self.num_attention_heads,
            self.num_hidden_layers,
            1e-5,
        )?;
        bounded("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ids {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<Ids>::deserialize(d)? {
        None => Vec::new(),
        Some(Ids::One(i)) => vec![i],
        Some(Ids::Many(v)) => v,
    })
}

fn bounded(key: &str, value: usize, max: usize) -> Result<(), String> {
    if value == 0 || value > max {
        return Err(format!("{key} ({value}) must be between 1 and {max}"));
    }
    Ok(())
}

/// The decoder LM a `config.json` describes.
#[derive(Clone, Debug, PartialEq)]
pub enum LmConfig {
    Opt(OptConfig),
    Llama(LlamaConfig),
}

impl LmConfig {
    /// The `model_type`s read as decoder LMs.
    pub const MODEL_TYPES: [&'static str; 3] = ["opt", "llama", "qwen2"];

    /// Parses an LM `config.json` (the whole file, or `text_config` of a BLIP-2 one).
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        match v.get("model_type").and_then(|m| m.as_str()) {
            Some("opt") => {
                let c: OptConfig = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
                c.validate()?;
                Ok(LmConfig::Opt(c))
            }
            Some("llama" | "qwen2") => Ok(LmConfig::Llama(LlamaConfig::from_json(v)?)),
            Some(other) => Err(format!(
                "language model type `{other}` is not supported; supported: {}",
                Self::MODEL_TYPES.join(", ")
            )),
            None => Err("no `model_type` string".into()),
        }
    }

    /// The `config.json` transformers reads back as the same model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (mut v, model_type, arch) = match self {
            LmConfig::Opt(c) => (
                serde_json::to_value(c).expect("config serialises"),
                "opt",
                "OPTForCausalLM",
            ),
            LmConfig::Llama(c) if c.qwen2 => (
                serde_json::to_value(c).expect("config serialises"),
                "qwen2",
                "Qwen2ForCausalLM",
            ),
            LmConfig::Llama(c) => (
                serde_json::to_value(c).expect("config serialises"),
                "llama",
                "LlamaForCausalLM",
            ),
        };
        v["model_type"] = model_type.into();
        v["architectures"] = serde_json::json!([arch]);
        v
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            LmConfig::Opt(c) => c.vocab_size,
            LmConfig::Llama(c) => c.vocab_size,
        }
    }

    /// Width of the input embeddings (what BLIP-2's `language_projection` must produce).
    pub fn embed_width(&self) -> usize {
        match self {
            LmConfig::Opt(c) => c.word_embed_proj_dim,
            LmConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn max_positions(&self) -> usize {
        match self {
            LmConfig::Opt(c) => c.max_position_embeddings,
            LmConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    pub fn layers(&self) -> usize {
        match self {
            LmConfig::Opt(c) => c.num_hidden_layers,
            LmConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// The tokens that end a generation (`eos_token_id`, one or several).
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            LmConfig::Opt(c) => &c.eos_token_id,
            LmConfig::Llama(c) => &c.eos_token_id,
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            LmConfig::Opt(c) => c.bos_token_id,
            LmConfig::Llama(c) => c.bos_token_id,
        }
    }
}
