//! A training batch as the loader yields it: pixels and padded token ids, plain buffers that a
//! task turns into tensors (DESIGN.md §1: data never touches a model).

use std::any::Any;
use std::sync::Arc;

use super::text::TokenBatch;

/// What a sample knows about which captions are true of its image, beyond its own caption, for
/// ITM's hard-negative draw: LAVIS (`blip2_qformer.py`) keeps pairs that share an `image_id` out
/// of the negatives; a generated shapes scene knows exactly which captions describe it
/// (`shapes::SceneTruth`).
pub trait CaptionTruth: Send + Sync + std::fmt::Debug {
    /// Whether the caption of `other` is true of this sample's image.
    fn caption_fits(&self, other: &dyn CaptionTruth) -> bool;
    /// This value as `Any`, so that an implementation can recognise its own kind in `other`.
    fn as_any(&self) -> &dyn Any;
    /// This value as bytes that [`decode_truth`] reads back (a data-parallel step gathers the
    /// truths of every rank's samples): a kind tag, then the kind's own encoding.
    fn encode(&self) -> Vec<u8>;
}

/// A [`CaptionTruth`] from [`CaptionTruth::encode`]'s bytes; `None` for bytes no kind reads.
pub fn decode_truth(bytes: &[u8]) -> Option<Arc<dyn CaptionTruth>> {
    match bytes.split_first()? {
        (&super::shapes::SCENE_TRUTH_TAG, rest) => {
            super::shapes::SceneTruth::decode(rest).map(|t| Arc::new(t) as Arc<dyn CaptionTruth>)
        }
        _ => None,
    }
}

/// One batch, ready for a model: pixels `[B, 3, H, W]` and padded token ids.
#[derive(Clone, Debug)]
pub struct Batch {
    pub pixels: Vec<f32>,
    pub hw: (usize, usize),
    pub tokens: TokenBatch,
    pub captions: Vec<String>,
    /// Which other captions are true of each sample's image, when the source knows (generated
    /// scenes do; read data does not: `None`).
    pub truths: Vec<Option<Arc<dyn CaptionTruth>>>,
    /// Which samples show the same image (BLIP's `idx`): equal ids, same image. Momentum
    /// distillation spreads its hard targets over every queued caption of an image.
    pub image_ids: Vec<u64>,
    /// Samples skipped while filling this batch, each with the reason.
    pub skipped: Vec<String>,
    /// Samples consumed from the stream once this batch is done (the position to resume at).
    pub position: u64,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// Samples `range` as a batch of their own (an accumulation micro-batch).
    pub fn rows(&self, range: std::ops::Range<usize>) -> Batch {
        let per = 3 * self.hw.0 * self.hw.1;
        Batch {
            pixels: self.pixels[range.start * per..range.end * per].to_vec(),
            hw: self.hw,
            tokens: TokenBatch {
                ids: self.tokens.ids[range.clone()].to_vec(),
                mask: self.tokens.mask[range.clone()].to_vec(),
            },
            captions: self.captions[range.clone()].to_vec(),
            truths: self.truths[range.clone()].to_vec(),
            image_ids: self.image_ids[range].to_vec(),
            skipped: Vec::new(),
            position: self.position,
        }
    }

    /// The pixels as a `[B, 3, H, W]` tensor on `device`.
    pub fn pixel_tensor(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let (h, w) = self.hw;
        candle_core::Tensor::from_slice(&self.pixels, (self.len(), 3, h, w), device)
    }
}
