//! Fine-tuning a pretrained CLIP (`[finetune] model = DIR`), as open_clip's `--pretrained`: the
//! task starts from a model directory's weights, in either layout `ModelDir` reads
//! (transformers' `CLIPModel` or open_clip's, ViT or ModifiedResNet), and keeps its tokenizer
//! and preprocessing. Training and the directory it writes are those of [`ClipTask`].

use std::path::Path;

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device};
use candle_nn::VarMap;

use super::clip::ClipTask;
use crate::error::{Error, Result};
use crate::infer::ClipPipeline;
use crate::models::clip::ClipLayout;
use crate::models::ModelDir;
use crate::objectives::contrastive::ContrastiveLoss;
use crate::train::task::{ExtraFiles, TaskParts};

/// Tokenizer files beside `tokenizer.json` that travel into the fine-tuned directory when the
/// source has them (a `vlalign train` shapes model ships its `tokenizer_config.json`).
const TOKENIZER_SIDE_FILES: [&str; 2] = ["tokenizer_config.json", "special_tokens_map.json"];

/// The largest side file copied: far above any tokenizer config.
const MAX_SIDE_FILE: u64 = 16 << 20;

impl ClipTask {
    /// The CLIP of the model directory `dir`, its weights as the starting point. The directory
    /// is loaded as inference loads it (every tensor present, of the config's shape, finite,
    /// none left over; the tokenizer and preprocessing it is used with), then the trainable
    /// variables start from its tensors (`nn::init::seeded_with`), BatchNorm running statistics
    /// included.
    ///
    /// `logit_bias` follows open_clip: a SigLIP loss over a checkpoint without one starts it at
    /// SigLIP's initial value; an InfoNCE loss over a checkpoint with one leaves it untrained
    /// and writes it back unchanged.
    pub fn from_dir(dir: &Path, loss: ContrastiveLoss, seed: u64, device: &Device) -> Result<Self> {
        let md = ModelDir::open(dir)?;
        let (cfg, layout) = md.clip("fine-tuning ([finetune] model)")?;
        if layout != ClipLayout::Full {
            return Err(Error::input(format!(
                "{} holds a single CLIP tower ({layout:?}); fine-tuning needs both towers and \
                 logit_scale (a CLIPModel directory)",
                dir.display()
            )));
        }
        let pipeline = ClipPipeline::from_dir(&md, device)?;
        let (Some(tokenizer), Some(processor)) = (pipeline.tokenizer, pipeline.processor) else {
            return Err(Error::input(format!(
                "{}: fine-tuning needs both towers",
                dir.display()
            )));
        };
        let mut stored = md.weights()?.all(DType::F32, device)?;
        // Left out of the trainable variables: a SigLIP bias under the InfoNCE loss (kept and
        // written back untrained, as open_clip keeps the unused parameter), and the
        // non-persistent `position_ids` buffers older checkpoints carry.
        let mut frozen = HashMap::new();
        if loss.logit_bias_init().is_none() {
            if let Some(bias) = stored.remove("logit_bias") {
                frozen.insert("logit_bias".to_string(), bias);
            }
        }
        stored.retain(|name, _| !name.ends_with("position_ids"));
        let names: HashSet<String> = stored.keys().cloned().collect();
        // The variables start from the stored tensors (the builder checks their shapes).
        let varmap = VarMap::new();
        let vb =
            crate::nn::init::seeded_with(&varmap, seed, HashMap::new(), stored, DType::F32, device);
        let parts = TaskParts {
            varmap,
            frozen,
            processor,
            tokenizer,
            extra_files: side_files(dir)?,
            device: device.clone(),
            comm: crate::dist::single(),
        };
        let task = ClipTask::assemble(cfg.clone(), loss, vb, parts)
            .map_err(|e| Error::weights(dir, e.to_string()))?;
        let wrong = |m: String| Error::weights(dir, m);
        let vars: HashSet<String> = task.parts.vars().into_iter().map(|(n, _)| n).collect();
        for name in &vars {
            if name == "logit_bias" && !names.contains(name) {
                tracing::info!(
                    "{} has no logit_bias; the SigLIP loss starts it at {:?}",
                    dir.display(),
                    loss.logit_bias_init()
                );
            } else if !names.contains(name) {
                return Err(wrong(format!(
                    "missing tensor `{name}` that the CLIP being fine-tuned trains"
                )));
            }
        }
        if let Some(name) = names.iter().find(|n| !vars.contains(*n)) {
            return Err(wrong(format!(
                "tensor `{name}` has no trainable variable in the CLIP being fine-tuned"
            )));
        }
        Ok(task)
    }
}

/// The tokenizer side files of `dir` that exist, as (name, bytes).
fn side_files(dir: &Path) -> Result<ExtraFiles> {
    let mut out = Vec::new();
    for name in TOKENIZER_SIDE_FILES {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if len > MAX_SIDE_FILE {
            return Err(Error::input(format!(
                "{} is {len} bytes; a tokenizer side file over {MAX_SIDE_FILE} is not copied",
                path.display()
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        out.push((name.to_string(), bytes));
    }
    Ok(out)
}
