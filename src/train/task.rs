//! What the trainer needs from a training objective. CLIP pretraining is one task; the
//! Q-Former stages and distillation are others — the loop is never copied.

use std::path::Path;

use candle_core::Var;

use super::optim::Grads;
use crate::data::loader::Batch;
use crate::error::Result;

/// The loss of one optimiser step and its logged parts.
#[derive(Clone, Debug, Default)]
pub struct LossTerms {
    pub total: f32,
    /// Named parts (e.g. `itc`, `itm`, `itg`), logged separately.
    pub parts: Vec<(String, f32)>,
}

pub trait Task {
    /// Trainable variables by checkpoint (HF) name.
    fn vars(&self) -> Vec<(String, Var)>;

    /// Gradients of one optimiser step over `micro` (the accumulation micro-batches, together
    /// one large batch) and the loss terms. A task whose loss couples samples (contrastive
    /// losses) must make the accumulated gradient equal the large-batch one.
    fn grads(&mut self, micro: &[Batch], step: u64) -> Result<(Grads, LossTerms)>;

    /// Runs after every optimiser step: clamp the temperature, update momentum encoders, ….
    fn after_step(&mut self) -> Result<()> {
        Ok(())
    }

    /// Scalars worth logging each step besides the loss (e.g. the logit scale).
    fn scalars(&self) -> Vec<(String, f32)> {
        Vec::new()
    }

    /// Writes the model directory files (HF layout) into the existing directory `dir`.
    fn write_model(&self, dir: &Path) -> Result<()>;

    /// Loads trainable weights from a model directory this task wrote.
    fn load_weights(&mut self, dir: &Path) -> Result<()>;
}
