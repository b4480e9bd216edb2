//! Files in and out, below every other layer: JSON, `.npy`, atomic directory writes, strict
//! safetensors loading and the files of a model directory (DESIGN.md §3). Knows nothing of
//! models, data sets or training; imports only `error`.

pub mod atomic;
pub mod json;
pub mod model_files;
pub mod npy;
pub mod weights;

pub use atomic::write_dir_atomic;
pub use json::{read_json, read_to_string, write_json};
pub use weights::Weights;
