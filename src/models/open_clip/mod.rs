//! open_clip model directories (mlfoundations/open_clip 3.x, the layout `push_to_hf_hub` writes
//! and LAION/DataComp checkpoints are published in): `open_clip_config.json` and
//! `open_clip_model.safetensors` with open_clip's tensor names. A ViT CLIP of open_clip is, tensor
//! for tensor, transformers' `CLIPModel` ([`names`]); it loads as a CLIP model directory through
//! a name map, so every verb, the trainer and `vlalign convert` serve it unchanged. A ResNet
//! CLIP (`models::clip::resnet`) keeps open_clip's names for its image tower. Options with no
//! equivalent are refused by name ([`config`]).

pub mod config;
pub mod names;

use std::path::{Path, PathBuf};

pub use config::OpenClipConfig;

use crate::error::{Error, Result};
use crate::io::Weights;

/// The config file that marks an open_clip directory.
pub const CONFIG_FILE: &str = "open_clip_config.json";

/// Weight files open_clip's `local-dir:` loader prefers, safetensors only (factory.py
/// `_find_checkpoint_in_dir`).
const WEIGHT_FILES: [&str; 2] = [
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
];

/// Reads `DIR/open_clip_config.json`.
pub fn read_config(dir: &Path) -> Result<(OpenClipConfig, PathBuf)> {
    let path = dir.join(CONFIG_FILE);
    let value: serde_json::Value = crate::io::read_json(&path)?;
    let cfg = serde_json::from_value(value).map_err(|e| Error::config(&path, e.to_string()))?;
    Ok((cfg, path))
}

/// The weights of an open_clip directory under transformers' CLIP names (a ResNet tower's under
/// open_clip's own).
pub fn weights(dir: &Path, resnet: bool) -> Result<Weights> {
    let Some(file) = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
    else {
        let pickle = ["open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"]
            .iter()
            .find(|f| dir.join(f).exists());
        let msg = match pickle {
            Some(f) => format!(
                "no open_clip_model.safetensors (found {f}: vlalign reads safetensors only, never \
                 pickle; save it with open_clip's push_to_hf_hub(..., safe_serialization=True))"
            ),
            None => "no open_clip_model.safetensors in the open_clip model directory".into(),
        };
        return Err(Error::weights(dir, msg));
    };
    // `attn_mask` is a non-persistent buffer, which older saves may still hold; BatchNorm's
    // `num_batches_tracked` only counts training steps.
    let ignored = ["attn_mask", "num_batches_tracked"];
    if resnet {
        Weights::open_remapped(&file, names::to_hf_resnet, &ignored)
    } else {
        Weights::open_remapped(&file, names::to_hf, &ignored)
    }
}
