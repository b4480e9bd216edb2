//! Writing the files of a model directory (DESIGN.md §3): `config.json`,
//! `preprocessor_config.json`, `tokenizer.json`, extra files such as `tokenizer_config.json`, and
//! `model.safetensors` with HF tensor names. The family decides the JSON; this writes it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::atomic::write_dir_atomic;
use super::json::write_json;
use crate::error::{Error, Result};

/// Everything a model directory holds besides the weights.
pub struct ModelFiles<'a> {
    /// `config.json` in the HF schema of the family (e.g. `CLIPConfig`, `Blip2Config`).
    pub config: serde_json::Value,
    /// `preprocessor_config.json`.
    pub preprocessor: serde_json::Value,
    /// `tokenizer.json` bytes.
    pub tokenizer_json: &'a [u8],
    /// Further files, `(name, bytes)`.
    pub extra: &'a [(String, Vec<u8>)],
}

/// Writes `files` and `tensors` (HF names) into the existing directory `dir`.
pub fn write_model_files(
    dir: &Path,
    files: &ModelFiles,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    write_json(&dir.join("config.json"), &files.config)?;
    write_json(&dir.join("preprocessor_config.json"), &files.preprocessor)?;
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, files.tokenizer_json).map_err(|e| Error::io(&tok, e))?;
    for (name, bytes) in files.extra {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }
    let weights = dir.join("model.safetensors");
    let contiguous = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    candle_core::safetensors::save(&contiguous, &weights)
        .map_err(|e| Error::weights(&weights, e.to_string()))
}

/// Writes a whole model directory at `target` atomically (see [`write_dir_atomic`]).
pub fn save_model_dir(
    target: &Path,
    files: &ModelFiles,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    write_dir_atomic(target, |tmp| write_model_files(tmp, files, tensors))
}
