//! Data in: image decoding and preprocessing, tokenisation. Nothing here touches a model's
//! tensors: it yields plain pixel buffers and token ids (DESIGN.md §1).

pub mod image;
pub mod jpeg;
pub mod loader;
pub mod manifest;
pub mod resample;
pub mod shapes;
pub mod text;
pub mod webdataset;
