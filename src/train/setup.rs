//! From a [`TrainConfig`] to a ready task and data source.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;

use super::clip_task::{ClipTask, ContrastiveLoss};
use crate::config::{ModelSpec, TrainConfig};
use crate::data::image::ImageProcessor;
use crate::data::loader::{Augment, Loader, LoaderConfig, Source};
use crate::data::shapes::{self, PairSet, ShapesConfig};
use crate::data::text::{word_level_tokenizer_config, TextTokenizer};
use crate::data::{manifest, webdataset};
use crate::error::{Error, Result};

/// Files shipped in a model directory besides the standard ones: (name, bytes).
pub type ExtraFiles = Vec<(String, Vec<u8>)>;

/// The tokenizer a spec names, its special ids `(bos, eos, pad)` and files to ship with it.
pub fn tokenizer_for(spec: &ModelSpec) -> Result<(TextTokenizer, (u32, u32, u32), ExtraFiles)> {
    let ctx = spec.context_length;
    match spec.tokenizer.as_str() {
        "shapes" => {
            let tok = TextTokenizer::word_level(&shapes::vocabulary(), ctx)?;
            let cfg = serde_json::to_vec_pretty(&word_level_tokenizer_config(ctx)).expect("json");
            Ok((tok, (2, 3, 0), vec![("tokenizer_config.json".into(), cfg)]))
        }
        "clip" => Ok((
            TextTokenizer::bundled_clip(ctx)?,
            (49406, 49407, 1),
            Vec::new(),
        )),
        path => {
            let tok = TextTokenizer::from_file(Path::new(path), ctx)?;
            let id = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
            let bos = id(&["<|startoftext|>", "[CLS]", "<s>", "<bos>"]).unwrap_or(0);
            let eos = id(&["<|endoftext|>", "[SEP]", "</s>", "<eos>"]).ok_or_else(|| {
                Error::config(
                    path,
                    "no end-of-text token (<|endoftext|>, [SEP], </s>) to pool the text at",
                )
            })?;
            let pad = tok.pad_id();
            Ok((tok, (bos, eos, pad), Vec::new()))
        }
    }
}

/// Resolves `data.source`: `shapes`, a manifest, or tar shards.
/// `image_size` is the side the shapes generator renders at (the image encoder's input).
pub fn source_for(cfg: &TrainConfig, image_size: usize) -> Result<Source> {
    let d = &cfg.data;
    let s = d.source.as_str();
    if s == "shapes" {
        return Ok(Source::Shapes(ShapesConfig {
            image_size,
            min_objects: d.shapes_min_objects,
            max_objects: d.shapes_max_objects,
            pairs: PairSet::Seen,
            twins: d.shapes_twins,
            object_weights: d.shapes_object_weights.clone(),
        }));
    }
    if webdataset::is_tar_pattern(s) {
        return Ok(Source::Tar(webdataset::shards(s)?));
    }
    let p = Path::new(s);
    if !p.is_file() {
        return Err(Error::input(format!(
            "data source {s:?} is neither \"shapes\", an existing manifest (.jsonl/.csv/.tsv) nor tar shards"
        )));
    }
    Ok(Source::Manifest(Arc::new(manifest::read(p)?)))
}

pub fn loader_config(cfg: &TrainConfig) -> LoaderConfig {
    let d = &cfg.data;
    LoaderConfig {
        batch_size: cfg.train.batch_size,
        workers: d.workers,
        prefetch: d.prefetch,
        seed: cfg.train.seed,
        augment: match d.augment.as_str() {
            "random_resized_crop" => Augment::RandomResizedCrop {
                scale: (d.crop_scale[0], d.crop_scale[1]),
            },
            _ => Augment::None,
        },
        shuffle_buffer: d.shuffle_buffer,
    }
}

/// A fresh CLIP task for the config (weights seeded by `train.seed`).
pub fn clip_task(cfg: &TrainConfig, device: &Device) -> Result<ClipTask> {
    let m = cfg.clip().map_err(Error::input)?;
    let (tok, (bos, eos, pad), extra) = tokenizer_for(m)?;
    let clip = m.clip_config(tok.vocab_size(), bos, eos, pad);
    let loss = if cfg.train.loss == "siglip" {
        ContrastiveLoss::Sigmoid
    } else {
        ContrastiveLoss::InfoNce
    };
    let processor = ImageProcessor::clip_default(m.image_size);
    ClipTask::new(clip, loss, processor, tok, extra, cfg.train.seed, device)
}

/// A loader factory for the task's data: call it with the position to start at.
pub fn clip_loader(
    cfg: &TrainConfig,
    task: &ClipTask,
    source: Source,
) -> impl FnOnce(u64) -> Result<Loader> {
    loader_for(cfg, task.processor.clone(), task.tokenizer.clone(), source)
}

/// A loader factory over `source` with this preprocessing and tokenizer.
pub fn loader_for(
    cfg: &TrainConfig,
    processor: ImageProcessor,
    tokenizer: TextTokenizer,
    source: Source,
) -> impl FnOnce(u64) -> Result<Loader> {
    let lc = loader_config(cfg);
    let tok = Arc::new(tokenizer);
    move |position| Loader::start(source, &lc, processor, tok, position)
}
