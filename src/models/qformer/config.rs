//! BLIP-2 configuration, deserialised from HF `config.json` (transformers'
//! configuration_blip_2.py: `Blip2Config`, `Blip2QFormerConfig`, `Blip2VisionConfig`). Missing
//! keys take transformers' defaults; unused keys (e.g. the language model's `text_config`) are
//! ignored.
//!
//! Beyond HF: `vision_config.model_type = "clip_vision_model"` names a frozen CLIP vision tower
//! (vlalign's own CLIP, cut to its penultimate layer as BLIP-2 §3.1 does with EVA ViT-g) in
//! place of `Blip2VisionModel`; `qformer_config.bos_token_id` is the [DEC] token of ITG.

use serde::{Deserialize, Serialize};

use crate::models::clip::config::{validate_tower, ClipVisionConfig};
use crate::nn::Activation;

/// `Blip2QFormerConfig`: a BERT with cross-attention to the image features.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QformerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// Layers `i` with `i % cross_attention_frequency == 0` cross-attend to the image.
    pub cross_attention_frequency: usize,
    /// Width of the image features (set to the vision tower's width, as transformers does).
    pub encoder_hidden_size: usize,
    /// Text positions get their own feed-forward (`intermediate` / `output`); true in the
    /// released ITM checkpoints and required for any text input.
    pub use_qformer_text_input: bool,
    /// The [DEC] token that replaces [CLS] for ITG (LAVIS adds it as BERT's `bos_token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
}

impl Default for QformerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            use_qformer_text_input: false,
            bos_token_id: None,
        }
    }
}

impl QformerConfig {
    pub fn has_cross_attention(&self, layer: usize) -> bool {
        layer.is_multiple_of(self.cross_attention_frequency.max(1))
    }
}

/// `Blip2VisionConfig`: EVA-style ViT (fused qkv, patch conv with bias, no pre-LayerNorm).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Blip2VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
}

impl Default for Blip2VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

/// The frozen image encoder of a BLIP-2 directory.
#[derive(Clone, Debug, PartialEq)]
pub enum VisionConfig {
    /// transformers' `Blip2VisionModel`.
    Blip2(Blip2VisionConfig),
    /// A CLIP vision tower (`CLIPVisionModel` names) whose `num_hidden_layers` are all used and
    /// whose `post_layernorm` normalises every token (BLIP-2's `ln_vision`).
    Clip(ClipVisionConfig),
}

impl VisionConfig {
    pub fn hidden_size(&self) -> usize {
        match self {
            VisionConfig::Blip2(c) => c.hidden_size,
            VisionConfig::Clip(c) => c.hidden_size,
        }
    }

    pub fn image_size(&self) -> usize {
        match self {
            VisionConfig::Blip2(c) => c.image_size,
            VisionConfig::Clip(c) => c.image_size,
        }
    }
}

/// `Blip2Config` as far as stage 1 (`Blip2ForImageTextRetrieval`) needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Blip2Config {
    pub vision: VisionConfig,
    pub qformer: QformerConfig,
    /// Learned queries (BLIP-2 §3.1: 32).
    pub num_query_tokens: usize,
    /// Width of the joint ITC space (`vision_projection` / `text_projection`).
    pub image_text_hidden_size: usize,
}

fn from_value<T: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
    key: &str,
) -> Result<T, String> {
    serde_json::from_value(v.get(key).cloned().unwrap_or(serde_json::json!({})))
        .map_err(|e| format!("{key}: {e}"))
}

impl Blip2Config {
    /// Parses a stage-1 `config.json` value; errors name the key.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let cfg = Self::parse(v)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The vision, Q-Former and query settings of any BLIP-2 `config.json`, checked by
    /// [`Blip2Config::validate_queries`] only (stage 2's Q-Former reads no text).
    pub fn parse(v: &serde_json::Value) -> Result<Self, String> {
        let vcfg = v
            .get("vision_config")
            .cloned()
            .unwrap_or(serde_json::json!({}));
        let vision = match vcfg.get("model_type").and_then(|m| m.as_str()) {
            Some("clip_vision_model") => VisionConfig::Clip(from_value(v, "vision_config")?),
            None | Some("blip_2_vision_model") => VisionConfig::Blip2(from_value(v, "vision_config")?),
            Some(other) => {
                return Err(format!(
                    "vision_config.model_type {other:?}: use \"blip_2_vision_model\" or \"clip_vision_model\""
                ))
            }
        };
        let mut qformer: QformerConfig = from_value(v, "qformer_config")?;
        qformer.encoder_hidden_size = vision.hidden_size();
        let get = |k: &str, d: usize| v.get(k).and_then(|x| x.as_u64()).map_or(d, |x| x as usize);
        let cfg = Self {
            vision,
            qformer,
            num_query_tokens: get("num_query_tokens", 32),
            image_text_hidden_size: get("image_text_hidden_size", 256),
        };
        cfg.validate_queries()?;
        Ok(cfg)
    }

    /// The `config.json` of a stage-1 model directory: HF's `Blip2Config` for
    /// `Blip2ForImageTextRetrieval`, with a CLIP tower's config as `vision_config` when the
    /// frozen encoder is one.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let vision = match &self.vision {
            VisionConfig::Clip(c) => {
                let mut v = serde_json::to_value(c).expect("config serialises");
                v["model_type"] = "clip_vision_model".into();
                v
            }
            VisionConfig::Blip2(c) => {
                let mut v = serde_json::to_value(c).expect("config serialises");
                v["model_type"] = "blip_2_vision_model".into();
                v
            }
        };
        let mut q = serde_json::to_value(&self.qformer).expect("config serialises");
        q["model_type"] = "blip_2_qformer".into();
        serde_json::json!({
            "architectures": ["Blip2ForImageTextRetrieval"],
            "model_type": "blip-2",
            "num_query_tokens": self.num_query_tokens,
            "image_text_hidden_size": self.image_text_hidden_size,
            "qformer_config": q,
            "vision_config": vision,
        })
    }

    /// A stage-1 (`Blip2ForImageTextRetrieval`) config: [`Blip2Config::validate_queries`], and
    /// a Q-Former that reads text.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_queries()?;
        if !self.qformer.use_qformer_text_input {
            return Err(
                "qformer_config.use_qformer_text_input is false: the Q-Former has no text \
                 feed-forward, so it cannot read text (stage-1 checkpoints set it true)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The vision tower, Q-Former and query settings, common to both stages.
    pub fn validate_queries(&self) -> Result<(), String> {
        let q = &self.qformer;
        validate_tower(
            "qformer_config",
            q.hidden_size,
            q.num_attention_heads,
            q.num_hidden_layers,
            q.layer_norm_eps,
        )?;
        match &self.vision {
            VisionConfig::Blip2(c) => validate_tower(
                "vision_config",
                c.hidden_size,
                c.num_attention_heads,
                c.num_hidden_layers,
                c.layer_norm_eps,
            )?,
            VisionConfig::Clip(c) => validate_tower(
                "vision_config",
                c.hidden_size,
                c.num_attention_heads,
                c.num_hidden_layers,
                c.layer_norm_eps,
            )?,
        }
        if self.num_query_tokens == 0 {
            return Err("num_query_tokens must be at least 1".into());
        }
        Ok(())
    }
}
