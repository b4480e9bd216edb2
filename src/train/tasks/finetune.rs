//! Fine-tuning a pretrained CLIP (`[finetune] model = DIR`), as open_clip's `--pretrained`: the
//! task starts from a model directory's weights, in either layout `ModelDir` reads
//! (transformers' `CLIPModel` or open_clip's, ViT or ModifiedResNet), and keeps its tokenizer
//! and preprocessing. Training and the directory it writes are those of [`ClipTask`].

use std::path::Path;

use candle_core::{DType, Device};

use super::clip::ClipTask;
use crate::error::{Error, Result};
use crate::infer::ClipPipeline;
use crate::models::clip::ClipLayout;
use crate::models::ModelDir;
use crate::objectives::contrastive::ContrastiveLoss;
use crate::train::task::ExtraFiles;

/// Tokenizer files beside `tokenizer.json` that travel into the fine-tuned directory when the
/// source has them (a `vlalign train` shapes model ships its `tokenizer_config.json`).
const TOKENIZER_SIDE_FILES: [&str; 2] = ["tokenizer_config.json", "special_tokens_map.json"];

/// The largest side file copied: far above any tokenizer config.
const MAX_SIDE_FILE: u64 = 16 << 20;

impl ClipTask {
    /// The CLIP of the model directory `dir`, its weights as the starting point. The directory
    /// is loaded as inference loads it (every tensor present, of the config's shape, finite,
    /// none left over; the tokenizer and preprocessing it is used with), then its tensors are
    /// copied into the trainable variables, BatchNorm running statistics included.
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
        let extra = side_files(dir)?;
        let mut task = ClipTask::new(cfg.clone(), loss, processor, tokenizer, extra, seed, device)?;
        let wrong = |m: String| Error::weights(dir, m);
        for (name, var) in task.parts.vars() {
            match stored.remove(&name) {
                Some(t) => var
                    .set(&t)
                    .map_err(|e| wrong(format!("tensor `{name}`: {e}")))?,
                None if name == "logit_bias" => tracing::info!(
                    "{} has no logit_bias; the SigLIP loss starts it at {:?}",
                    dir.display(),
                    loss.logit_bias_init()
                ),
                None => {
                    return Err(wrong(format!(
                        "missing tensor `{name}` that the CLIP being fine-tuned trains"
                    )))
                }
            }
        }
        for (name, t) in stored {
            if name == "logit_bias" {
                task.parts.frozen.insert(name, t);
            } else if !name.ends_with("position_ids") {
                return Err(wrong(format!(
                    "tensor `{name}` has no trainable variable in the CLIP being fine-tuned"
                )));
            }
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
