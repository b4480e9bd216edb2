//! `open_clip_config.json` as open_clip 3.x writes it (`push_to_hf_hub.save_config_for_hf`):
//! `{"model_cfg": {...}, "preprocess_cfg": {...}}`. `model_cfg` is sparse — the keys of a
//! built-in `model_configs/*.json` — so every field takes the default of open_clip's
//! `CLIPVisionCfg` / `CLIPTextCfg` dataclasses (model.py). Options that change the computation
//! and that vlalign does not implement are refused by name in [`OpenClipConfig::to_clip`], never
//! ignored.

use serde::Deserialize;
use serde_json::Value;

use crate::models::clip::{ClipConfig, ClipTextConfig, ClipVisionConfig, ResNetConfig};
use crate::nn::Activation;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
pub struct OpenClipConfig {
    pub model_cfg: ModelCfg,
    #[serde(default)]
    pub preprocess_cfg: PreprocessCfg,
}

/// open_clip's `CLIP.__init__` keyword arguments.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelCfg {
    pub embed_dim: usize,
    pub vision_cfg: VisionCfg,
    pub text_cfg: TextCfg,
    /// QuickGELU (OpenAI's weights) instead of exact GELU, in both towers.
    #[serde(default)]
    pub quick_gelu: bool,
    /// Only the initial value; the checkpoint's `logit_scale` wins.
    #[serde(default = "ln_inverse_007")]
    pub init_logit_scale: f64,
    /// When set the model has a SigLIP-style `logit_bias`.
    #[serde(default)]
    pub init_logit_bias: Option<f64>,
    #[serde(default)]
    pub custom_text: bool,
    #[serde(default)]
    pub multimodal_cfg: Option<Value>,
    /// Everything else, to name what is not supported.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

fn ln_inverse_007() -> f64 {
    (1.0f64 / 0.07).ln()
}

/// `CLIPVisionCfg`: a ViT when `layers` is a number, a ModifiedResNet when it is four numbers.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VisionCfg {
    pub layers: Value,
    pub width: usize,
    pub head_width: usize,
    pub mlp_ratio: f64,
    pub patch_size: Option<usize>,
    pub image_size: Value,
    pub ls_init_value: Option<f64>,
    pub patch_dropout: f64,
    pub attentional_pool: Value,
    pub no_ln_pre: bool,
    pub pos_embed_type: String,
    pub final_ln_after_pool: bool,
    pub pool_type: String,
    pub output_tokens: bool,
    pub act_kwargs: Option<Value>,
    pub norm_kwargs: Option<Value>,
    pub block_type: Option<String>,
    pub timm_model_name: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl Default for VisionCfg {
    fn default() -> Self {
        Self {
            layers: 12.into(),
            width: 768,
            head_width: 64,
            mlp_ratio: 4.0,
            patch_size: Some(16),
            image_size: 224.into(),
            ls_init_value: None,
            patch_dropout: 0.0,
            attentional_pool: false.into(),
            no_ln_pre: false,
            pos_embed_type: "learnable".into(),
            final_ln_after_pool: false,
            pool_type: "tok".into(),
            output_tokens: false,
            act_kwargs: None,
            norm_kwargs: None,
            block_type: None,
            timm_model_name: None,
            other: Default::default(),
        }
    }
}

/// `CLIPTextCfg`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TextCfg {
    pub context_length: usize,
    pub vocab_size: usize,
    pub hf_tokenizer_name: Option<String>,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    pub ls_init_value: Option<f64>,
    pub embed_cls: bool,
    pub no_causal_mask: bool,
    pub pool_type: String,
    pub proj_bias: bool,
    pub proj_type: String,
    pub act_kwargs: Option<Value>,
    pub norm_kwargs: Option<Value>,
    pub block_type: Option<String>,
    pub hf_model_name: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl Default for TextCfg {
    fn default() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            hf_tokenizer_name: None,
            width: 512,
            heads: 8,
            layers: 12,
            mlp_ratio: 4.0,
            ls_init_value: None,
            embed_cls: false,
            no_causal_mask: false,
            pool_type: "argmax".into(),
            proj_bias: false,
            proj_type: "linear".into(),
            act_kwargs: None,
            norm_kwargs: None,
            block_type: None,
            hf_model_name: None,
            other: Default::default(),
        }
    }
}

/// open_clip's `PreprocessCfg` (transform.py); the size comes from `vision_cfg.image_size`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct PreprocessCfg {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub interpolation: String,
    pub resize_mode: String,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl Default for PreprocessCfg {
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        Self {
            // OPENAI_DATASET_MEAN / _STD (open_clip constants.py).
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            interpolation: "bicubic".into(),
            resize_mode: "shortest".into(),
            other: Default::default(),
        }
    }
}

/// The keys of the config dataclasses that only matter for training tricks vlalign does not
/// run, or for outputs it does not return; accepted and ignored.
const HARMLESS: [&str; 6] = [
    "output_tokens",
    "patch_dropout",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "cast_dtype",
    "timm_model_pretrained",
];

/// `int(width * mlp_ratio)`, as open_clip sizes the MLP (Python truncation).
fn mlp_width(width: usize, ratio: f64) -> Result<usize, String> {
    let m = width as f64 * ratio;
    if !(m.is_finite() && (1.0..=1e6).contains(&m)) {
        return Err(format!(
            "mlp_ratio {ratio} gives an MLP width of {m} for width {width}"
        ));
    }
    Ok(m as usize)
}

/// LayerNorm epsilon from `norm_kwargs` (`{"eps": ...}`), 1e-5 (PyTorch's default) otherwise.
fn norm_eps(prefix: &str, kwargs: &Option<Value>) -> Result<f64, String> {
    let Some(v) = kwargs else { return Ok(1e-5) };
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{prefix}.norm_kwargs must be an object"))?;
    for key in obj.keys() {
        if key != "eps" {
            return Err(format!(
                "{prefix}.norm_kwargs.{key} is not supported (only eps)"
            ));
        }
    }
    match obj.get("eps") {
        None => Ok(1e-5),
        Some(e) => e
            .as_f64()
            .ok_or_else(|| format!("{prefix}.norm_kwargs.eps must be a number")),
    }
}

/// The activation both towers use: QuickGELU, exact GELU, or GELU's tanh form through
/// `act_kwargs = {"approximate": "tanh"}`.
fn activation(prefix: &str, quick: bool, kwargs: &Option<Value>) -> Result<Activation, String> {
    let tanh = match kwargs {
        None => false,
        Some(v) if v.as_object().is_some_and(|o| o.is_empty()) => false,
        Some(v) if v == &serde_json::json!({"approximate": "tanh"}) => true,
        Some(v) if v == &serde_json::json!({"approximate": "none"}) => false,
        Some(v) => return Err(format!("{prefix}.act_kwargs {v} is not supported")),
    };
    Ok(match (quick, tanh) {
        (true, _) => Activation::QuickGelu,
        (false, true) => Activation::GeluTanh,
        (false, false) => Activation::Gelu,
    })
}

impl OpenClipConfig {
    /// The image tower's input size (open_clip also allows `[h, w]`; square only here).
    pub fn image_size(&self) -> Result<usize, String> {
        let v = &self.model_cfg.vision_cfg.image_size;
        let size = match v {
            Value::Number(n) => n.as_u64(),
            Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64(),
            _ => None,
        };
        size.map(|s| s as usize)
            .filter(|s| (1..=4096).contains(s))
            .ok_or_else(|| {
                format!("model_cfg.vision_cfg.image_size {v} is not supported (a square size up to 4096)")
            })
    }

    /// True when the image tower is a ModifiedResNet (`layers` holds four block counts).
    pub fn is_resnet(&self) -> bool {
        self.model_cfg.vision_cfg.layers.is_array()
    }

    /// The transformers `CLIPConfig` this open_clip ViT model is, computation for computation,
    /// or an error naming the first option that has no equivalent here.
    pub fn to_clip(&self) -> Result<ClipConfig, String> {
        let m = &self.model_cfg;
        let (v, t) = (&m.vision_cfg, &m.text_cfg);
        let refuse = |key: &str, why: &str| Err(format!("{key} is not supported: {why}"));
        if m.custom_text || t.hf_model_name.is_some() {
            return refuse(
                "model_cfg.custom_text / text_cfg.hf_model_name",
                "vlalign reads open_clip's CLIP class (native text tower) only",
            );
        }
        if m.multimodal_cfg.is_some() {
            return refuse("model_cfg.multimodal_cfg", "CoCa models are not supported");
        }
        if let Some(name) = &v.timm_model_name {
            return refuse(
                "model_cfg.vision_cfg.timm_model_name",
                &format!("timm image towers ({name}) are not supported"),
            );
        }
        if v.attentional_pool != Value::Bool(false) {
            return refuse(
                "model_cfg.vision_cfg.attentional_pool",
                "CoCa's attentional pooler is not implemented",
            );
        }
        if v.no_ln_pre {
            return refuse(
                "model_cfg.vision_cfg.no_ln_pre",
                "the ViT always has its pre-LayerNorm here",
            );
        }
        if v.pool_type != "tok" {
            return refuse(
                "model_cfg.vision_cfg.pool_type",
                &format!("`{}` (only `tok`, the class token)", v.pool_type),
            );
        }
        if !matches!(v.pos_embed_type.as_str(), "learnable" | "sin_cos_2d") {
            return refuse(
                "model_cfg.vision_cfg.pos_embed_type",
                &format!("`{}`", v.pos_embed_type),
            );
        }
        for (prefix, ls, block) in [
            ("model_cfg.vision_cfg", v.ls_init_value, &v.block_type),
            ("model_cfg.text_cfg", t.ls_init_value, &t.block_type),
        ] {
            if ls.is_some() {
                return refuse(
                    &format!("{prefix}.ls_init_value"),
                    "layer scale is not implemented",
                );
            }
            if block.as_deref().is_some_and(|b| b != "default") {
                return refuse(
                    &format!("{prefix}.block_type"),
                    "only the default residual attention block is implemented",
                );
            }
        }
        if t.embed_cls || t.no_causal_mask || t.pool_type != "argmax" {
            return refuse(
                "model_cfg.text_cfg (embed_cls / no_causal_mask / pool_type)",
                "the text tower is causal and pooled at its end-of-text token (`argmax`)",
            );
        }
        if t.proj_bias || t.proj_type != "linear" {
            return refuse(
                "model_cfg.text_cfg.proj_bias / proj_type",
                "the text projection is a plain matrix",
            );
        }
        for (prefix, other) in [
            ("model_cfg", &m.other),
            ("model_cfg.vision_cfg", &v.other),
            ("model_cfg.text_cfg", &t.other),
        ] {
            for (key, value) in other {
                let off = matches!(value, Value::Bool(false) | Value::Null);
                if !off && !HARMLESS.contains(&key.as_str()) && !key.starts_with("timm_") {
                    return refuse(&format!("{prefix}.{key}"), "not implemented in vlalign");
                }
            }
        }
        if self.is_resnet() {
            return self.resnet_clip();
        }
        let vision_layers = v
            .layers
            .as_u64()
            .filter(|l| (1..=256).contains(l))
            .ok_or_else(|| format!("model_cfg.vision_cfg.layers {} must be 1..=256", v.layers))?
            as usize;
        let patch_size = v
            .patch_size
            .ok_or("model_cfg.vision_cfg.patch_size is missing")?;
        if v.head_width == 0 || !v.width.is_multiple_of(v.head_width) {
            return Err(format!(
                "model_cfg.vision_cfg.width ({}) must be a multiple of head_width ({})",
                v.width, v.head_width
            ));
        }
        let vision_config = ClipVisionConfig {
            hidden_size: v.width,
            intermediate_size: mlp_width(v.width, v.mlp_ratio)?,
            projection_dim: m.embed_dim,
            num_hidden_layers: vision_layers,
            num_attention_heads: v.width / v.head_width,
            num_channels: 3,
            image_size: self.image_size()?,
            patch_size,
            hidden_act: activation("model_cfg.vision_cfg", m.quick_gelu, &v.act_kwargs)?,
            layer_norm_eps: norm_eps("model_cfg.vision_cfg", &v.norm_kwargs)?,
        };
        let cfg = ClipConfig {
            text_config: self.text_config()?,
            vision_config,
            projection_dim: m.embed_dim,
            logit_scale_init_value: m.init_logit_scale,
            vision_resnet: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The text tower, the same for both image towers.
    fn text_config(&self) -> Result<ClipTextConfig, String> {
        let m = &self.model_cfg;
        let t = &m.text_cfg;
        Ok(ClipTextConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.width,
            intermediate_size: mlp_width(t.width, t.mlp_ratio)?,
            projection_dim: m.embed_dim,
            num_hidden_layers: t.layers,
            num_attention_heads: t.heads,
            max_position_embeddings: t.context_length,
            hidden_act: activation("model_cfg.text_cfg", m.quick_gelu, &t.act_kwargs)?,
            layer_norm_eps: norm_eps("model_cfg.text_cfg", &t.norm_kwargs)?,
            // open_clip pools at the argmax of the ids, the end-of-text token of its BPE; this
            // id makes transformers (and vlalign) pool at its first occurrence, the same place.
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        })
    }

    /// The CLIP of a ModifiedResNet image tower (`layers` = four block counts).
    fn resnet_clip(&self) -> Result<ClipConfig, String> {
        let m = &self.model_cfg;
        let v = &m.vision_cfg;
        let counts: Vec<usize> = v
            .layers
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_u64())
                    .map(|n| n as usize)
                    .collect()
            })
            .unwrap_or_default();
        let layers: [usize; 4] = counts.try_into().map_err(|_| {
            format!(
                "model_cfg.vision_cfg.layers {} must be four block counts for a ModifiedResNet",
                v.layers
            )
        })?;
        if v.head_width == 0 {
            return Err("model_cfg.vision_cfg.head_width must be positive".into());
        }
        let image_size = self.image_size()?;
        let resnet = ResNetConfig {
            layers,
            width: v.width,
            heads: v.width * 32 / v.head_width,
            image_size,
            output_dim: m.embed_dim,
        };
        let cfg = ClipConfig {
            text_config: self.text_config()?,
            // Unused beside the ResNet but for the image size the pipeline reads.
            vision_config: ClipVisionConfig {
                image_size,
                projection_dim: m.embed_dim,
                ..ClipVisionConfig::default()
            },
            projection_dim: m.embed_dim,
            logit_scale_init_value: m.init_logit_scale,
            vision_resnet: Some(resnet),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
