//! The model directory (DESIGN.md §3): HF layout — `config.json`, `model.safetensors`,
//! `tokenizer.json`, `preprocessor_config.json` — read here into a typed description.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::models::clip::{ClipConfig, ClipLayout, ClipTextConfig, ClipVisionConfig};

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &Path) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::config(path, e.to_string()))
}

/// What `config.json` describes.
#[derive(Clone, Debug)]
pub enum ModelKind {
    Clip(ClipConfig, ClipLayout),
}

/// A model directory that exists and has a readable config.
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub path: PathBuf,
    pub kind: ModelKind,
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
        if !cfg_path.is_file() {
            return Err(Error::config(
                &cfg_path,
                "missing: not a model directory (expected config.json and model.safetensors)",
            ));
        }
        let value: serde_json::Value = crate::error::read_json(&cfg_path)?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(&cfg_path, "no `model_type` string"))?
            .to_string();
        let kind = match model_type.as_str() {
            "clip" => ModelKind::Clip(parse(value, &cfg_path)?, ClipLayout::Full),
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
            other => {
                return Err(Error::config(
                    &cfg_path,
                    format!(
                        "model_type `{other}` is not supported (clip, clip_vision_model, clip_text_model)"
                    ),
                ))
            }
        };
        let ModelKind::Clip(cfg, _) = &kind;
        cfg.validate().map_err(|m| Error::config(&cfg_path, m))?;
        Ok(Self {
            path: path.to_path_buf(),
            kind,
        })
    }
}
