//! Data in: image decoding and preprocessing, tokenisation, data sources (the built-in shapes,
//! manifests, WebDataset shards) and the seeded loader. Nothing here touches a model: it yields
//! plain pixel buffers and token ids (DESIGN.md §1). Imports only io, rng and error.

pub mod batch;
pub mod image;
pub mod jpeg;
pub mod loader;
pub mod manifest;
pub mod resample;
pub mod shapes;
pub mod shapes_files;
pub mod text;
pub mod webdataset;
