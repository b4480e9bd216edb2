//! vlalign: train, evaluate and serve vision-language alignment models (CLIP, the BLIP-2
//! Q-Former, ALBEF/BLIP distillation) in Rust, with HF-compatible model directories.
//!
//! ARCHITECTURE.md is the code map. The layers, each importing only those below it:
//! `apps` (demo, bench) → `train`, `eval` → `infer` → `models`, `objectives`, `data` → `nn`,
//! `io`, `rng`, `dist` → `error`.

pub mod apps;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod infer;
pub mod io;
pub mod models;
pub mod nn;
pub mod objectives;
pub mod rng;
pub mod serve;
pub mod train;

pub use error::{Error, Result};
