//! `vlalign convert`: an open_clip ViT checkpoint written out as a transformers `CLIPModel`
//! directory — the tensors under HF names ([`crate::models::open_clip::names`]), `config.json`
//! in the `CLIPConfig` schema, `preprocessor_config.json` and the tokenizer the open_clip
//! directory is read with.

use std::path::Path;

use candle_core::{DType, Device};

use super::ClipPipeline;
use crate::error::{Error, Result};
use crate::io::model_files::{save_model_dir, ModelFiles};
use crate::models::ModelDir;

/// What a conversion wrote.
pub struct Converted {
    pub tensors: usize,
    /// Notes for the user: what the HF directory cannot express exactly.
    pub notes: Vec<String>,
}

/// Converts the open_clip directory `from` into a new HF directory `to` (written atomically; an
/// existing `to` is refused).
pub fn open_clip_to_hf(from: &Path, to: &Path) -> Result<Converted> {
    let md = ModelDir::open(from)?;
    let Some(oc) = md.open_clip() else {
        return Err(Error::input(format!(
            "{} is not an open_clip directory (no open_clip_config.json); `vlalign convert` \
             writes transformers directories from open_clip ones",
            from.display()
        )));
    };
    let (cfg, _) = md.clip("`vlalign convert`")?;
    if oc.is_resnet() {
        return Err(Error::input(format!(
            "{} holds a ModifiedResNet CLIP, which has no transformers twin (CLIPModel is ViT \
             only); use the open_clip directory with vlalign directly",
            from.display()
        )));
    }
    if to.exists() {
        return Err(Error::input(format!(
            "{} exists; `vlalign convert` writes a new directory",
            to.display()
        )));
    }
    // Loading the pipeline checks every tensor, the tokenizer and the preprocessing first.
    let pipeline = ClipPipeline::from_dir(&md, &Device::Cpu)?;
    let tensors = md.weights()?.all(DType::F32, &Device::Cpu)?;
    let (Some(processor), Some(tokenizer)) = (&pipeline.processor, &pipeline.tokenizer) else {
        return Err(Error::input(format!(
            "{}: `vlalign convert` needs both towers",
            from.display()
        )));
    };
    let mut notes = Vec::new();
    if tensors.contains_key("logit_bias") {
        notes.push(
            "logit_bias (SigLIP-style) is kept in model.safetensors; transformers' CLIPModel \
             ignores it, vlalign uses it"
                .to_string(),
        );
    }
    if processor.crop.is_some() {
        notes.push(
            "preprocessing: transformers' CLIPImageProcessor rounds an odd crop margin down, \
             open_clip (torchvision) half to even; images whose resized side exceeds the crop by \
             an odd number of pixels shift by one pixel"
                .to_string(),
        );
    }
    if oc.preprocess_cfg.resize_mode == "squash" {
        notes.push(
            "preprocessing: resize_mode squash is written as a BLIP-style exact resize".into(),
        );
    }
    let files = ModelFiles {
        config: cfg.to_hf_json(),
        preprocessor: processor.to_hf_json(),
        tokenizer_json: tokenizer.json_bytes(),
        extra: &[],
    };
    save_model_dir(to, &files, &tensors)?;
    Ok(Converted {
        tensors: tensors.len(),
        notes,
    })
}
