//! The models, forward only; weights named as in transformers so HF checkpoints load unchanged.
//! A model takes tensors and returns tensors; its constructor takes a `VarBuilder` and a config
//! that deserialises from the family's HF `config.json`. [`kind`] decides what a model directory
//! holds. Models import `nn` and `io`, never data, objectives, training or inference.

pub mod bert;
pub mod blip2;
pub mod clip;
pub mod kind;
pub mod lm;
pub mod open_clip;
pub mod qformer;

pub use kind::{ModelDir, ModelKind};
