//! Evaluation on embeddings: zero-shot classification with prompt templates and image–text
//! retrieval. Pure functions of L2-normalised embeddings, plus the shapes and manifest drivers.

pub mod qformer;
pub mod report;
pub mod retrieval;
pub mod zeroshot;

use candle_core::Tensor;

use crate::data::image::RgbImage;
use crate::error::Result;

/// Anything that maps images and texts into the joint space (L2-normalised rows).
pub trait Embedder {
    fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor>;
    fn embed_texts(&self, texts: &[String]) -> Result<Tensor>;
}
