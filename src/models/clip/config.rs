//! CLIP configuration, deserialised from HF `config.json` (transformers' configuration_clip.py).
//! Missing keys take transformers' defaults (the ViT-B/32 shape); keys we do not use are ignored,
//! since HF writes many bookkeeping keys.

use serde::{Deserialize, Serialize};

use super::resnet::ResNetConfig;
use crate::nn::Activation;

/// `CLIPTextConfig`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Only used by the standalone `CLIPTextModelWithProjection` layout.
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The context length: longer texts are truncated to this many tokens.
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    /// Decides the pooled position: with the legacy value 2 transformers pools at the argmax of
    /// the ids (the original CLIP EOS has the largest id); otherwise at the first EOS.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

/// `CLIPVisionConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Only used by the standalone `CLIPVisionModelWithProjection` layout.
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Patches per side: the patch convolution (stride = kernel) drops a remainder.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `CLIPConfig`: both towers and the joint space.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
    /// Initial value of the learned log temperature, ln(1/0.07) = 2.6592 (CLIP §2.5).
    pub logit_scale_init_value: f64,
    /// A ResNet image tower instead of the ViT (CLIP §2.4; open_clip's ModifiedResNet). Not a
    /// transformers key: such a model has no transformers twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_resnet: Option<ResNetConfig>,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            vision_resnet: None,
        }
    }
}

/// Checks what transformers would reject only later, with a message naming the key.
pub fn validate_tower(
    prefix: &str,
    hidden: usize,
    heads: usize,
    layers: usize,
    layer_norm_eps: f64,
) -> Result<(), String> {
    // A zero, negative or NaN epsilon makes LayerNorm divide by the square root of a negative
    // or zero variance: every output NaN, and every ranking of them meaningless.
    if !(layer_norm_eps.is_finite() && layer_norm_eps > 0.0) {
        return Err(format!(
            "{prefix}.layer_norm_eps ({layer_norm_eps}) must be a small positive number (e.g. 1e-5)"
        ));
    }
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(format!(
            "{prefix}.hidden_size ({hidden}) must be a positive multiple of {prefix}.num_attention_heads ({heads})"
        ));
    }
    if layers == 0 {
        return Err(format!("{prefix}.num_hidden_layers must be at least 1"));
    }
    Ok(())
}

impl ClipConfig {
    /// The side of the square images the image tower takes (the ResNet's or the ViT's).
    pub fn image_size(&self) -> usize {
        match &self.vision_resnet {
            Some(r) => r.image_size,
            None => self.vision_config.image_size,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        validate_tower(
            "text_config",
            t.hidden_size,
            t.num_attention_heads,
            t.num_hidden_layers,
            t.layer_norm_eps,
        )?;
        if t.max_position_embeddings < 2 {
            return Err("text_config.max_position_embeddings must be at least 2".into());
        }
        if let Some(r) = &self.vision_resnet {
            return r.validate();
        }
        validate_tower(
            "vision_config",
            v.hidden_size,
            v.num_attention_heads,
            v.num_hidden_layers,
            v.layer_norm_eps,
        )?;
        if v.patch_size == 0 || v.patch_size > v.image_size {
            return Err(format!(
                "vision_config.patch_size ({}) must be between 1 and image_size ({})",
                v.patch_size, v.image_size
            ));
        }
        Ok(())
    }

    /// The `config.json` transformers writes for `CLIPModel`, so our directories load there.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut text = serde_json::to_value(&self.text_config).expect("config serialises");
        text["model_type"] = "clip_text_model".into();
        let mut vision = serde_json::to_value(&self.vision_config).expect("config serialises");
        vision["model_type"] = "clip_vision_model".into();
        let mut cfg = serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "dtype": "float32",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": 1.0,
            "text_config": text,
            "vision_config": vision,
        });
        if let Some(r) = &self.vision_resnet {
            cfg["vision_resnet"] = serde_json::to_value(r).expect("config serialises");
        }
        cfg
    }
}
