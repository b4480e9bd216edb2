//! Ranking: top-k by score, and LAVIS's ITM rerank (`blip2.py` `compute_sim_matrix`): a query's
//! best `k` candidates by ITC are rescored by the ITM match logit plus the ITC score. Retrieval
//! (`vlalign retrieve --rerank itm`) and evaluation (ITM-reranked recall) both rank through here.

use candle_core::{DType, Tensor};

use super::qformer::QformerPipeline;
use crate::error::Result;

/// Indices of the `k` best scores, best first (ties keep index order; NaN ranks as largest, as
/// `f32::total_cmp` orders it).
pub fn topk(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    idx.truncate(k);
    idx
}

/// Row-wise [`topk`] of a `[N, M]` score tensor.
pub fn topk_rows(scores: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let s: Vec<Vec<f32>> = scores.to_dtype(DType::F32)?.to_vec2()?;
    Ok(s.iter().map(|row| topk(row, k)).collect())
}

/// A candidate rescored by ITM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reranked {
    /// Index of the candidate.
    pub index: usize,
    /// ITM match logit + ITC score.
    pub score: f32,
    /// The ITM match logit alone.
    pub itm: f32,
}

impl QformerPipeline {
    /// One query's ITC-best `k` candidates, rescored. `itc[c]` is candidate c's ITC score and
    /// `pair(c)` its `(image row of image_embeds, text)`: for a text query the candidates are
    /// images, for an image query texts. Returned in ITC order.
    pub fn rerank<'t>(
        &self,
        image_embeds: &Tensor,
        itc: &[f32],
        k: usize,
        pair: impl Fn(usize) -> (usize, &'t str),
    ) -> Result<Vec<Reranked>> {
        let top = topk(itc, k);
        let pairs: Vec<(usize, &str)> = top.iter().map(|&c| pair(c)).collect();
        Ok(top
            .iter()
            .zip(self.match_logits(image_embeds, &pairs)?)
            .map(|(&c, m)| Reranked {
                index: c,
                score: m + itc[c],
                itm: m,
            })
            .collect())
    }
}
