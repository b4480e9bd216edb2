//! From a config to a run, in one place (DESIGN.md §1): config → tokenizer and task → data
//! source → loader → [`trainer::run`]. `vlalign train`, both demo stages and the tests build
//! their runs here; the config's model section (`[model]` CLIP, `[qformer]` BLIP-2 stage 1)
//! chooses the task.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Var};

use super::config::{AugmentKind, TrainConfig};
use super::optim::Grads;
use super::task::{LossTerms, Task, TaskParts};
use super::tasks::blip2::Blip2Task;
use super::tasks::clip::ClipTask;
use super::tasks::qformer::QformerTask;
use super::trainer::{self, EvalHook, RunOptions, RunReport};
use crate::data::batch::Batch;
use crate::data::loader::{Augment, Loader, LoaderConfig, Source};
use crate::data::shapes::{PairSet, ShapesConfig};
use crate::data::{manifest, webdataset};
use crate::error::{Error, Result};

/// The task a config trains.
pub enum AnyTask {
    Clip(ClipTask),
    Qformer(QformerTask),
    Blip2(Box<Blip2Task>),
}

impl AnyTask {
    /// A fresh task for `cfg` (weights seeded by `train.seed`).
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Self> {
        let (loss, seed) = (cfg.train.loss, cfg.train.seed);
        let distil = |t: ClipTask| {
            let t = t
                .with_precision(cfg.train.precision)?
                .with_checkpointing(cfg.train.grad_checkpointing)?;
            match &cfg.distill {
                Some(d) => t.with_distill(d, seed),
                None => Ok(t),
            }
        };
        Ok(match (&cfg.model, &cfg.finetune, &cfg.qformer) {
            (Some(spec), _, _) => {
                AnyTask::Clip(distil(ClipTask::from_spec(spec, loss, seed, device)?)?)
            }
            (None, Some(ft), _) => {
                AnyTask::Clip(distil(ClipTask::from_dir(&ft.model, loss, seed, device)?)?)
            }
            (None, None, Some(_)) => AnyTask::Qformer(QformerTask::new(cfg, device)?),
            (None, None, None) if cfg.blip2.is_some() => {
                AnyTask::Blip2(Box::new(Blip2Task::new(cfg, device)?))
            }
            (None, None, None) => {
                return Err(Error::input(
                    "the config has no [model], [finetune], [qformer] or [blip2] section",
                ))
            }
        })
    }

    /// The side of the square images the image encoder takes.
    pub fn image_size(&self) -> usize {
        match self {
            AnyTask::Clip(t) => t.config.image_size(),
            AnyTask::Qformer(t) => t.config.vision.image_size(),
            AnyTask::Blip2(t) => t.config.blip2.vision.image_size(),
        }
    }

    pub fn as_clip(&self) -> Option<&ClipTask> {
        match self {
            AnyTask::Clip(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_qformer(&self) -> Option<&QformerTask> {
        match self {
            AnyTask::Qformer(t) => Some(t),
            _ => None,
        }
    }

    fn task(&self) -> &dyn Task {
        match self {
            AnyTask::Clip(t) => t,
            AnyTask::Qformer(t) => t,
            AnyTask::Blip2(t) => t.as_ref(),
        }
    }

    fn task_mut(&mut self) -> &mut dyn Task {
        match self {
            AnyTask::Clip(t) => t,
            AnyTask::Qformer(t) => t,
            AnyTask::Blip2(t) => t.as_mut(),
        }
    }
}

impl Task for AnyTask {
    fn parts(&self) -> &TaskParts {
        self.task().parts()
    }

    fn parts_mut(&mut self) -> &mut TaskParts {
        self.task_mut().parts_mut()
    }

    fn grads(&mut self, micro: &[Batch], step: u64) -> Result<(Grads, LossTerms)> {
        self.task_mut().grads(micro, step)
    }

    fn data_parallel(&self) -> Result<()> {
        self.task().data_parallel()
    }

    fn loss_names(&self) -> &'static [&'static str] {
        self.task().loss_names()
    }

    fn after_step(&mut self) -> Result<()> {
        self.task_mut().after_step()
    }

    fn scalars(&self) -> Vec<(String, f32)> {
        self.task().scalars()
    }

    fn state(&self) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
        self.task().state()
    }

    fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, candle_core::Tensor>,
        from: &str,
    ) -> Result<()> {
        self.task_mut().load_state(state, from)
    }

    fn hf_config(&self) -> serde_json::Value {
        self.task().hf_config()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.task().vars()
    }
}

/// A training run assembled from a config: the task and where its data comes from.
pub struct Run {
    pub config: TrainConfig,
    pub task: AnyTask,
    pub source: Source,
}

impl Run {
    /// Builds the task of `config` on `device` and resolves its data source.
    pub fn new(config: TrainConfig, device: &Device) -> Result<Self> {
        let task = AnyTask::new(&config, device)?;
        let source = source_for(&config, task.image_size())?;
        Ok(Self {
            config,
            task,
            source,
        })
    }

    /// A factory for the run's loader: call it with the stream position to start at.
    pub fn loader_factory(&self) -> impl FnOnce(u64) -> Result<Loader> {
        self.rank_loader_factory(0, 1)
    }

    /// The loader factory of rank `rank` of `size`: its part of every global batch.
    pub fn rank_loader_factory(
        &self,
        rank: usize,
        size: usize,
    ) -> impl FnOnce(u64) -> Result<Loader> {
        let mut lc = loader_config(&self.config);
        lc.shard = (rank, size);
        let source = self.source.clone();
        let parts = self.task.parts();
        let (processor, tokenizer) = (parts.processor.clone(), Arc::new(parts.tokenizer.clone()));
        move |position| Loader::start(source, &lc, processor, tokenizer, position)
    }

    /// The run's loader from the start of its data.
    pub fn loader(&self) -> Result<Loader> {
        self.loader_factory()(0)
    }

    /// Trains (or resumes, per `opts`) to `train.steps`, with an optional periodic evaluation.
    pub fn train(
        &mut self,
        opts: &RunOptions,
        eval: Option<EvalHook<AnyTask>>,
    ) -> Result<RunReport> {
        let loader = self.rank_loader_factory(opts.comm.rank(), opts.comm.size());
        trainer::run(&mut self.task, &self.config, opts, loader, eval)
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
            caption_noise: d.shapes_caption_noise,
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

/// The loader settings of a config.
pub fn loader_config(cfg: &TrainConfig) -> LoaderConfig {
    let d = &cfg.data;
    LoaderConfig {
        batch_size: cfg.train.batch_size,
        workers: d.workers,
        prefetch: d.prefetch,
        seed: cfg.train.seed,
        augment: match d.augment {
            AugmentKind::RandomResizedCrop => Augment::RandomResizedCrop {
                scale: (d.crop_scale[0], d.crop_scale[1]),
            },
            AugmentKind::None => Augment::None,
        },
        shuffle_buffer: d.shuffle_buffer,
        shard: (0, 1),
    }
}
