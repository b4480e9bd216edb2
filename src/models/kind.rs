//! What a model directory holds, decided in this one place (DESIGN.md §3: a model directory is an
//! HF checkpoint). The kind comes from `config.json`'s `model_type` (and, for BLIP-2, its
//! `architectures`); every verb, pipeline and task asks [`ModelDir::open`] and none reads
//! `config.json` itself. A directory that is not supported gets one error naming what was found
//! and what is supported.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::Weights;
use crate::models::bert::BertConfig;
use crate::models::blip2::Blip2LmConfig;
use crate::models::clip::{ClipConfig, ClipLayout, ClipTextConfig, ClipVisionConfig};
use crate::models::lm::LmConfig;
use crate::models::open_clip::{self, OpenClipConfig};
use crate::models::qformer::Blip2Config;

/// The `model_type`s (and architectures) vlalign loads, for error messages.
pub const SUPPORTED: &str = "clip (CLIPModel), clip_vision_model, clip_text_model, \
    open_clip ViT CLIP (open_clip_config.json), blip-2 (Blip2ForImageTextRetrieval: the Q-Former of BLIP-2 stage 1; \
    Blip2ForConditionalGeneration: stage 2, the Q-Former feeding a language model), bert (BertModel), \
    opt / llama / qwen2 (causal language models)";

/// The model families of a model directory, each with its parsed, validated config.
#[derive(Clone, Debug)]
pub enum ModelKind {
    /// transformers' `CLIPModel`, or one tower of it with its projection.
    Clip(ClipConfig, ClipLayout),
    /// BLIP-2 stage 1: `Blip2ForImageTextRetrieval` (plus vlalign's ITG head, when present).
    Qformer(Blip2Config),
    /// A BERT encoder (`BertModel`, or a task model with the encoder under `bert.`).
    Bert(BertConfig),
    /// BLIP-2 stage 2: `Blip2ForConditionalGeneration` (the Q-Former feeding a frozen LM).
    Blip2Lm(Box<Blip2LmConfig>),
    /// A decoder-only causal LM (`OPTForCausalLM`, `LlamaForCausalLM`, `Qwen2ForCausalLM`).
    Lm(LmConfig),
}

impl ModelKind {
    /// A short name for messages: "CLIP", "BLIP-2 Q-Former", "BERT".
    pub fn name(&self) -> &'static str {
        match self {
            ModelKind::Clip(..) => "CLIP",
            ModelKind::Qformer(_) => "BLIP-2 Q-Former",
            ModelKind::Bert(_) => "BERT",
            ModelKind::Lm(_) => "language",
            ModelKind::Blip2Lm(_) => "BLIP-2 (Q-Former + language model)",
        }
    }
}

/// How a directory stores its model.
#[derive(Clone, Debug)]
pub enum Format {
    /// transformers' layout: `config.json`, `model.safetensors` with HF names.
    Hf,
    /// open_clip's layout (`open_clip_config.json`, open_clip names), read through a name map.
    OpenClip(Box<OpenClipConfig>),
}

/// A model directory that exists and whose config is readable and valid.
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub path: PathBuf,
    pub kind: ModelKind,
    pub format: Format,
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &Path) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::config(path, e.to_string()))
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::input(format!(
                "model directory {} does not exist",
                path.display()
            )));
        }
        if !path.is_dir() {
            return Err(Error::input(format!(
                "{} is not a directory (a model directory holds config.json and model.safetensors)",
                path.display()
            )));
        }
        let cfg_path = path.join("config.json");
        if !cfg_path.is_file() && path.join(open_clip::CONFIG_FILE).is_file() {
            let (oc, oc_path) = open_clip::read_config(path)?;
            let cfg = oc.to_clip().map_err(|m| Error::config(&oc_path, m))?;
            return Ok(Self {
                path: path.to_path_buf(),
                kind: ModelKind::Clip(cfg, ClipLayout::Full),
                format: Format::OpenClip(Box::new(oc)),
            });
        }
        if !cfg_path.is_file() {
            return Err(Error::config(
                &cfg_path,
                "missing: not a model directory (expected config.json and model.safetensors, \
                 or open_clip's open_clip_config.json and open_clip_model.safetensors)",
            ));
        }
        let value: serde_json::Value = crate::io::read_json(&cfg_path)?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(&cfg_path, "no `model_type` string"))?
            .to_string();
        let kind = match model_type.as_str() {
            "clip" => {
                let cfg: ClipConfig = parse(value, &cfg_path)?;
                ModelKind::Clip(cfg, ClipLayout::Full)
            }
            "clip_vision_model" => {
                let vision_config: ClipVisionConfig = parse(value, &cfg_path)?;
                let cfg = ClipConfig {
                    projection_dim: vision_config.projection_dim,
                    vision_config,
                    ..ClipConfig::default()
                };
                ModelKind::Clip(cfg, ClipLayout::VisionOnly)
            }
            "clip_text_model" => {
                let text_config: ClipTextConfig = parse(value, &cfg_path)?;
                let cfg = ClipConfig {
                    projection_dim: text_config.projection_dim,
                    text_config,
                    ..ClipConfig::default()
                };
                ModelKind::Clip(cfg, ClipLayout::TextOnly)
            }
            "blip-2" => {
                let archs: Vec<&str> = value
                    .get("architectures")
                    .and_then(|a| a.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                if archs.contains(&"Blip2ForConditionalGeneration") {
                    let cfg = Blip2LmConfig::from_json(&value)
                        .map_err(|m| Error::config(&cfg_path, m))?;
                    ModelKind::Blip2Lm(Box::new(cfg))
                } else {
                    if let Some(other) = archs.iter().find(|a| **a != "Blip2ForImageTextRetrieval")
                    {
                        return Err(Error::config(
                            &cfg_path,
                            format!(
                                "blip-2 architecture `{other}` is not supported; supported: {SUPPORTED}"
                            ),
                        ));
                    }
                    let cfg =
                        Blip2Config::from_json(&value).map_err(|m| Error::config(&cfg_path, m))?;
                    ModelKind::Qformer(cfg)
                }
            }
            "bert" => ModelKind::Bert(parse(value, &cfg_path)?),
            t if LmConfig::MODEL_TYPES.contains(&t) => {
                ModelKind::Lm(LmConfig::from_json(&value).map_err(|m| Error::config(&cfg_path, m))?)
            }
            other => {
                return Err(Error::config(
                    &cfg_path,
                    format!("model_type `{other}` is not supported; supported: {SUPPORTED}"),
                ))
            }
        };
        let valid = match &kind {
            ModelKind::Clip(cfg, _) => cfg.validate(),
            ModelKind::Qformer(cfg) => cfg.validate(),
            ModelKind::Bert(cfg) => cfg.validate(),
            ModelKind::Lm(_) | ModelKind::Blip2Lm(_) => Ok(()),
        };
        valid.map_err(|m| Error::config(&cfg_path, m))?;
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            format: Format::Hf,
        })
    }

    /// The weights, under the names of the kind's model (open_clip's through its name map).
    pub fn weights(&self) -> Result<Weights> {
        match &self.format {
            Format::Hf => Weights::open(&self.path),
            Format::OpenClip(cfg) => open_clip::weights(&self.path, cfg.is_resnet()),
        }
    }

    /// The open_clip config, for an open_clip directory.
    pub fn open_clip(&self) -> Option<&OpenClipConfig> {
        match &self.format {
            Format::OpenClip(cfg) => Some(cfg),
            Format::Hf => None,
        }
    }

    /// The CLIP config of a CLIP directory; any other kind is an error naming `purpose`.
    pub fn clip(&self, purpose: &str) -> Result<(&ClipConfig, ClipLayout)> {
        match &self.kind {
            ModelKind::Clip(cfg, layout) => Ok((cfg, *layout)),
            other => Err(self.wrong_kind(other, "a CLIP model", purpose)),
        }
    }

    /// The BLIP-2 config of a Q-Former directory; any other kind is an error naming `purpose`.
    pub fn qformer(&self, purpose: &str) -> Result<&Blip2Config> {
        match &self.kind {
            ModelKind::Qformer(cfg) => Ok(cfg),
            other => Err(self.wrong_kind(other, "a BLIP-2 Q-Former", purpose)),
        }
    }

    /// The BERT config of a BERT directory; any other kind is an error naming `purpose`.
    pub fn bert(&self, purpose: &str) -> Result<&BertConfig> {
        match &self.kind {
            ModelKind::Bert(cfg) => Ok(cfg),
            other => Err(self.wrong_kind(other, "a BERT", purpose)),
        }
    }

    /// The config of a causal-LM directory; any other kind is an error naming `purpose`.
    pub fn lm(&self, purpose: &str) -> Result<&LmConfig> {
        match &self.kind {
            ModelKind::Lm(cfg) => Ok(cfg),
            other => Err(self.wrong_kind(other, "a causal language model", purpose)),
        }
    }

    /// The config of a BLIP-2 stage-2 directory; any other kind is an error naming `purpose`.
    pub fn blip2_lm(&self, purpose: &str) -> Result<&Blip2LmConfig> {
        match &self.kind {
            ModelKind::Blip2Lm(cfg) => Ok(cfg),
            other => Err(self.wrong_kind(other, "a BLIP-2 stage-2 model", purpose)),
        }
    }

    fn wrong_kind(&self, found: &ModelKind, wanted: &str, purpose: &str) -> Error {
        Error::input(format!(
            "{} holds a {} model; {purpose} needs {wanted}",
            self.path.display(),
            found.name()
        ))
    }
}
