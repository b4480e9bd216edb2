//! BLIP-2's image-grounded text generation objective (Li et al. 2023, §3.2 "ITG"; LAVIS
//! `blip2_qformer.py` and `Qformer.py` `BertLMHeadModel`): [DEC] replaces [CLS], the text is
//! decoded through the multimodal causal mask, and the LM head's prediction at position i is
//! scored against token i + 1 with label smoothing 0.1, padding ignored.

use candle_core::{Result, Tensor};

use super::itc::LABEL_SMOOTHING;
use super::ops::cross_entropy_smoothed_sum;

/// `ids` with the first token of every row replaced by `dec` ([DEC]).
pub fn decoder_ids(ids: &[Vec<u32>], dec: u32) -> Vec<Vec<u32>> {
    ids.iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(first) = r.first_mut() {
                *first = dec;
            }
            r
        })
        .collect()
}

/// The ITG loss: `logits` `[B, T, V]` over the decoder ids; position i predicts `ids[i + 1]`
/// where `mask[i + 1] == 1` (padding is ignored, as LAVIS's `-100` labels).
pub fn itg_loss(logits: &Tensor, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor> {
    let (sum, count) = itg_loss_sum(logits, ids, mask)?;
    if count == 0 {
        candle_core::bail!("ITG over no targets (every text is empty)");
    }
    sum / count as f64
}

/// The summed ITG cross-entropy and the number of predicted tokens (non-padding text positions
/// after the first): a shard's share of [`itg_loss`] once divided by the whole batch's count.
pub fn itg_loss_sum(
    logits: &Tensor,
    ids: &[Vec<u32>],
    mask: &[Vec<u32>],
) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        candle_core::bail!("ITG needs at least 2 text positions, got {t}");
    }
    let mut targets = Vec::with_capacity(b * (t - 1));
    for (row, m) in ids.iter().zip(mask) {
        for i in 1..t {
            targets.push((m[i] == 1).then_some(row[i]));
        }
    }
    let scores = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    cross_entropy_smoothed_sum(&scores, &targets, LABEL_SMOOTHING)
}

/// How many tokens ITG predicts over these attention masks (every non-padding position after
/// the first).
pub fn itg_target_count(mask: &[Vec<u32>]) -> usize {
    mask.iter()
        .map(|m| m.iter().skip(1).filter(|&&x| x == 1).count())
        .sum()
}
