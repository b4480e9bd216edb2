//! A CLIP vision tower as BLIP-2's frozen image encoder (BLIP-2 §3.1 takes EVA ViT-g's
//! penultimate layer): the `vision_model.*` tensors of a CLIP model directory without its final
//! `drop` layers and without CLIP's own `post_layernorm`, in whose place BLIP-2 trains a fresh
//! `ln_vision` (stored as `vision_model.post_layernorm`; see config.rs).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::clip::{ClipLayout, ClipVisionConfig};
use crate::models::ModelDir;

/// Whether `name` belongs to a tower cut to its first `layers` layers, `post_layernorm` aside.
fn kept(name: &str, layers: usize) -> bool {
    let Some(rest) = name.strip_prefix("vision_model.") else {
        return false;
    };
    if rest.starts_with("post_layernorm") {
        return false;
    }
    match rest.strip_prefix("encoder.layers.") {
        Some(l) => l
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < layers),
        None => true,
    }
}

/// The cut tower of the CLIP directory `dir`: its config (with the layers that remain) and its
/// tensors on `device`.
pub fn frozen_clip_vision(
    dir: &Path,
    drop: usize,
    device: &Device,
) -> Result<(ClipVisionConfig, HashMap<String, Tensor>)> {
    let md = ModelDir::open(dir)?;
    let (cfg, layout) = md.clip("a frozen image encoder (qformer.vision_model)")?;
    if layout == ClipLayout::TextOnly {
        return Err(Error::input(format!(
            "{} is a CLIP text tower; qformer.vision_model needs a vision tower",
            dir.display()
        )));
    }
    if cfg.vision_resnet.is_some() {
        return Err(Error::input(format!(
            "{} has a ResNet image tower; qformer.vision_model takes a ViT (its patch tokens \
             are what the queries attend to)",
            dir.display()
        )));
    }
    let mut vision = cfg.vision_config.clone();
    if drop >= vision.num_hidden_layers {
        return Err(Error::config(
            dir.join("config.json"),
            format!(
                "the vision tower has {} layers; qformer.vision_drop_layers = {drop} leaves none",
                vision.num_hidden_layers
            ),
        ));
    }
    vision.num_hidden_layers -= drop;
    let w = md.weights()?;
    let vb = w.var_builder(DType::F32, device);
    let mut frozen = HashMap::new();
    for name in w
        .model_names()
        .into_iter()
        .filter(|n| kept(n, vision.num_hidden_layers))
    {
        let t = vb
            .get_unchecked(&name)
            .map_err(|e| Error::weights(dir, e.to_string()))?;
        frozen.insert(name, t);
    }
    if frozen.is_empty() {
        return Err(Error::weights(
            dir,
            "no vision_model.* tensors: qformer.vision_model must be a CLIP model directory",
        ));
    }
    Ok((vision, frozen))
}
