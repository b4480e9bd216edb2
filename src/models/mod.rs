//! The models, forward only; weights named as in transformers so HF checkpoints load unchanged.

pub mod bert;
pub mod clip;
pub mod qformer;
pub mod weights;
