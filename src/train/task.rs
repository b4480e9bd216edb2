//! What the trainer needs from a training objective ([`Task`]), and the plumbing every task
//! shares ([`TaskParts`]): its trainable variables, its frozen tensors, the inputs' tokenizer and
//! preprocessing, and the files that make its model directory. CLIP pretraining and BLIP-2
//! stage 1 are tasks; the loop is never copied.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::optim::Grads;
use crate::data::batch::Batch;
use crate::data::image::ImageProcessor;
use crate::data::text::TextTokenizer;
use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::io::model_files::{write_model_files, ModelFiles};

/// The loss of one optimiser step and its logged parts.
#[derive(Clone, Debug, Default)]
pub struct LossTerms {
    pub total: f32,
    /// Named parts (e.g. `itc`, `itm`, `itg`), logged and plotted separately; the names are
    /// the task's [`Task::loss_names`].
    pub parts: Vec<(String, f32)>,
}

/// Files shipped in a model directory besides the standard ones: (name, bytes).
pub type ExtraFiles = Vec<(String, Vec<u8>)>;

/// What every task holds besides its model and objective.
pub struct TaskParts {
    /// The trainable variables, by checkpoint (HF) name.
    pub varmap: VarMap,
    /// Tensors stored in the model directory but never trained (BLIP-2's frozen image encoder).
    pub frozen: HashMap<String, Tensor>,
    pub processor: ImageProcessor,
    pub tokenizer: TextTokenizer,
    /// Extra files written into model directories (e.g. tokenizer_config.json).
    pub extra_files: ExtraFiles,
    pub device: Device,
    /// The ranks of a data-parallel run ([`crate::dist::single`] for one process); the trainer
    /// sets it, and tasks whose loss couples samples exchange features through it.
    pub comm: Arc<dyn Comm>,
}

impl TaskParts {
    /// Trainable variables by name (sorted by the optimiser, not here).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The variable `name`, if the task has one.
    pub fn var(&self, name: &str) -> Option<Var> {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .get(name)
            .cloned()
    }

    /// Adds the gradient of every trainable variable found in `grads` into `into`, detached:
    /// candle leaves a variable's gradient attached to the ops that made it (a convolution's
    /// kernel gradient references the step's activations), and the optimiser's moments would
    /// then hold every step's graph alive.
    pub fn collect(&self, grads: &GradStore, into: &mut Grads) -> Result<()> {
        for (name, var) in self.varmap.data().lock().expect("varmap lock").iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                match into.get_mut(name) {
                    Some(acc) => *acc = (&*acc + &g)?,
                    None => {
                        into.insert(name.clone(), g);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a model directory's files into the existing directory `dir`: `config` as
    /// `config.json`, the preprocessing, the tokenizer, the extra files, and the frozen and
    /// trainable tensors as `model.safetensors`.
    pub fn write_model(&self, dir: &Path, config: serde_json::Value) -> Result<()> {
        let mut tensors = self.frozen.clone();
        for (k, v) in self.vars() {
            tensors.insert(k, v.as_tensor().clone());
        }
        let files = ModelFiles {
            config,
            preprocessor: self.processor.to_hf_json(),
            tokenizer_json: self.tokenizer.json_bytes(),
            extra: &self.extra_files,
        };
        write_model_files(dir, &files, &tensors)
    }

    /// Loads the trainable variables from a model directory this task wrote.
    pub fn load_weights(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("model.safetensors");
        self.varmap
            .load(&path)
            .map_err(|e| Error::weights(&path, e.to_string()))
    }
}

pub trait Task {
    /// The shared plumbing.
    fn parts(&self) -> &TaskParts;
    fn parts_mut(&mut self) -> &mut TaskParts;

    /// Gradients of one optimiser step over `micro` (the accumulation micro-batches, together
    /// one large batch) and the loss terms. A task whose loss couples samples (contrastive
    /// losses) must make the accumulated gradient equal the large-batch one.
    fn grads(&mut self, micro: &[Batch], step: u64) -> Result<(Grads, LossTerms)>;

    /// Whether the task trains with its batch spread over ranks; `Err` says why not. Under
    /// several ranks [`Task::grads`] returns this rank's part of the gradient and of the loss
    /// terms, which the trainer sums over ranks.
    fn data_parallel(&self) -> Result<()> {
        Err(Error::input(
            "this task does not train data-parallel yet; run it as one process",
        ))
    }

    /// The names of the loss terms [`Task::grads`] reports.
    fn loss_names(&self) -> &'static [&'static str];

    /// Runs after every optimiser step: clamp the temperature, update momentum encoders, ….
    fn after_step(&mut self) -> Result<()> {
        Ok(())
    }

    /// State a resumed run needs besides the trainable variables and the optimiser (momentum
    /// encoders, feature queues), saved in each checkpoint as `task_state.safetensors`.
    fn state(&self) -> Result<HashMap<String, Tensor>> {
        Ok(HashMap::new())
    }

    /// Restores [`Task::state`] from a checkpoint (`from` names it in errors).
    fn load_state(&mut self, _state: &HashMap<String, Tensor>, _from: &str) -> Result<()> {
        Ok(())
    }

    /// Scalars worth logging each step besides the loss (e.g. the logit scale).
    fn scalars(&self) -> Vec<(String, f32)> {
        Vec::new()
    }

    /// The model directory's `config.json` (the family's HF schema).
    fn hf_config(&self) -> serde_json::Value;

    /// Trainable variables by checkpoint (HF) name.
    fn vars(&self) -> Vec<(String, Var)> {
        self.parts().vars()
    }

    /// Writes the model directory files (HF layout) into the existing directory `dir`.
    fn write_model(&self, dir: &Path) -> Result<()> {
        self.parts().write_model(dir, self.hf_config())
    }

    /// Loads trainable weights from a model directory this task wrote.
    fn load_weights(&mut self, dir: &Path) -> Result<()> {
        self.parts_mut().load_weights(dir)
    }
}
