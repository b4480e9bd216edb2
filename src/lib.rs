//! vlalign: train, evaluate and serve vision-language alignment models (CLIP, the BLIP-2
//! Q-Former, ALBEF/BLIP distillation) in Rust, with HF-compatible model directories.
//! See shared/DESIGN.md for the map; `models/` is pure nn, `data/` yields plain batches.

pub mod bench;
pub mod config;
pub mod data;
pub mod demo;
pub mod demo_qformer;
pub mod error;
pub mod eval;
pub mod model_dir;
pub mod models;
pub mod nn;
pub mod npy;
pub mod objectives;
pub mod pipeline;
pub mod qformer_pipeline;
pub mod train;

pub use error::{Error, Result};
