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

/// Writes a directory atomically: `fill` writes into a temporary sibling, every file is synced,
/// then the sibling is renamed into place (replacing an older directory of that name), so a
/// reader never sees a half-written model or checkpoint.
pub fn write_dir_atomic(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = target
        .file_name()
        .ok_or_else(|| Error::input(format!("{} has no directory name", target.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
        let path = entry.map_err(|e| Error::io(&tmp, e))?.path();
        if path.is_file() {
            let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if target.exists() {
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    }
    std::fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a JSON value, pretty-printed, naming the file on failure.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Everything a CLIP model directory holds besides the weights.
pub struct ClipDirContents<'a> {
    pub config: &'a crate::models::clip::ClipConfig,
    pub processor: &'a crate::data::image::ImageProcessor,
    /// `tokenizer.json` bytes (the bundled CLIP BPE when the model has no tokenizer of its own).
    pub tokenizer_json: &'a [u8],
}

/// Saves a CLIP model directory in HF layout that vlalign and transformers both load.
pub fn save_clip_dir(
    target: &Path,
    contents: &ClipDirContents,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    write_dir_atomic(target, |tmp| write_clip_files(tmp, contents, tensors))
}

/// Writes the files of a CLIP model directory into the existing directory `dir`.
pub fn write_clip_files(
    dir: &Path,
    contents: &ClipDirContents,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    write_json(&dir.join("config.json"), &contents.config.to_hf_json())?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &contents.processor.to_hf_json(),
    )?;
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, contents.tokenizer_json).map_err(|e| Error::io(&tok, e))?;
    let weights = dir.join("model.safetensors");
    let contiguous = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    candle_core::safetensors::save(&contiguous, &weights)
        .map_err(|e| Error::weights(&weights, e.to_string()))
}
