//! `vlalign demo`: the main job on built-in data (DESIGN.md §5), in two stages that share the
//! run builder and differ only in their config and their report — [`clip`] trains the tiny CLIP
//! of configs/clip-tiny.toml; [`qformer`] trains BLIP-2 stage 1 of configs/qformer-tiny.toml on
//! that CLIP's frozen vision tower; [`blip2`] bridges that Q-Former to a frozen pretrained LM
//! (BLIP-2 stage 2, configs/blip2-smollm2.toml). All evaluate on held-out images generated here.

pub mod blip2;
pub mod clip;
pub mod qformer;

use std::path::PathBuf;

use candle_core::Device;

use crate::data::shapes::{self, ShapesConfig, ShapesSample};
use crate::error::{Error, Result};
use crate::train::config::TrainConfig;

/// Seed of the evaluation images (never the training stream's, which starts at `train.seed`).
pub const EVAL_SEED: u64 = 1_000_003;
/// Held-out image–caption pairs for retrieval.
pub const RETRIEVAL_PAIRS: usize = 1000;

/// What both stages take.
pub struct DemoOptions {
    /// The run directory: the CLIP run writes here (its model in `out/model`), the Q-Former run
    /// in `out/qformer`.
    pub out: PathBuf,
    /// A training config to use instead of the stage's built-in one (a shapes config).
    pub config: Option<PathBuf>,
    pub resume: bool,
    /// Overrides `train.steps` (see [`TrainConfig::set_steps`]).
    pub steps: Option<u64>,
    pub progress: bool,
    pub device: Device,
}

impl DemoOptions {
    /// The options of an earlier stage run because its model is missing: the built-in config
    /// and its own step count, the rest as given.
    fn earlier_stage(&self) -> Self {
        Self {
            out: self.out.clone(),
            config: None,
            resume: self.resume,
            steps: None,
            progress: self.progress,
            device: self.device.clone(),
        }
    }

    /// The stage's config: `--config` or the built-in `toml` (named `name` in errors), with
    /// `--steps` applied; the data must be the built-in shapes.
    fn config(&self, name: &str, toml: &str) -> Result<TrainConfig> {
        let mut cfg = match &self.config {
            Some(p) => TrainConfig::from_file(p)?,
            None => TrainConfig::from_toml(toml).map_err(|m| Error::config(name, m))?,
        };
        if cfg.data.source != "shapes" {
            return Err(Error::input(
                "the demo trains on the built-in shapes data: data.source must be \"shapes\"",
            ));
        }
        if let Some(s) = self.steps {
            cfg.set_steps(s).map_err(Error::input)?;
        }
        Ok(cfg)
    }
}

/// The held-out retrieval pairs: 1–3 objects per image, seen colour–shape pairs (as training).
pub fn retrieval_pairs(image_size: usize) -> Vec<ShapesSample> {
    let mixed = ShapesConfig {
        image_size,
        ..ShapesConfig::default()
    };
    (0..RETRIEVAL_PAIRS as u64)
        .map(|i| shapes::generate(&mixed, EVAL_SEED + 2, i))
        .collect()
}
