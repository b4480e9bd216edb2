//! BERT configuration, deserialised from HF `config.json` (transformers' configuration_bert.py).
//! Missing keys take transformers' defaults (bert-base-uncased); unused keys are ignored.

use serde::{Deserialize, Serialize};

use crate::nn::Activation;

/// `BertConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }
}

impl BertConfig {
    pub fn validate(&self) -> Result<(), String> {
        crate::models::clip::config::validate_tower(
            "config",
            self.hidden_size,
            self.num_attention_heads,
            self.num_hidden_layers,
            self.layer_norm_eps,
        )
    }
}
