//! BLIP-2's image–text matching objective (Li et al. 2023, §3.2 "ITM"; LAVIS
//! `blip2_qformer.py`): each image gets one hard-negative text and each text one hard-negative
//! image, drawn from the softmax of the ITC similarities with the positives masked out; the
//! batch is positives + both negative sets, labelled 1, 0, 0; cross-entropy on the 2-way head.

use candle_core::{Result, Tensor};
use rand::Rng;

use super::ops::cross_entropy_smoothed;

/// Hard negatives for a square `[B, B]` similarity (row i = image i, column j = text j; the
/// temperature-scaled ITC logits, no gradient needed). Returns `(text_for_image, image_for_text)`:
/// for image i a text index ≠ i, drawn with probability softmax over j ≠ i of `sim[i, j]`; for
/// text j an image index ≠ j, drawn from softmax over i ≠ j of `sim[i, j]` (LAVIS masks the
/// diagonal with −10000 before the softmax, i.e. exactly these distributions).
pub fn sample_hard_negatives<R: Rng>(
    sim: &Tensor,
    rng: &mut R,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let s: Vec<Vec<f32>> = sim.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    let b = s.len();
    if b < 2 || s.iter().any(|r| r.len() != b) {
        candle_core::bail!("hard negatives need a square similarity with at least 2 rows, got {b}");
    }
    let draw = |rng: &mut R, row: &dyn Fn(usize) -> f32, skip: usize| -> usize {
        let w = negative_weights(b, row, skip);
        let mut u: f64 = rng.random::<f64>();
        for (k, &p) in w.iter().enumerate() {
            if k != skip && u < p {
                return k;
            }
            u -= p;
        }
        // Rounding left a sliver: take the last admissible index.
        (0..b).rev().find(|&k| k != skip).expect("b >= 2")
    };
    let text_for_image = (0..b).map(|i| draw(rng, &|j| s[i][j], i)).collect();
    let image_for_text = (0..b).map(|j| draw(rng, &|i| s[i][j], j)).collect();
    Ok((text_for_image, image_for_text))
}

/// softmax over k ≠ `skip` of `row(k)` (0 at `skip`), in f64.
pub fn negative_weights(b: usize, row: &dyn Fn(usize) -> f32, skip: usize) -> Vec<f64> {
    let max = (0..b)
        .filter(|&k| k != skip)
        .map(|k| row(k) as f64)
        .fold(f64::MIN, f64::max);
    let e: Vec<f64> = (0..b)
        .map(|k| {
            if k == skip {
                0.0
            } else {
                (row(k) as f64 - max).exp()
            }
        })
        .collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// ITM labels for the `[positives; negative images; negative texts]` batch of `b` pairs.
pub fn itm_labels(b: usize) -> Vec<Option<u32>> {
    (0..3 * b).map(|k| Some(u32::from(k < b))).collect()
}

/// Cross-entropy of the `[3B, 2]` ITM logits against [`itm_labels`] (no smoothing, as LAVIS).
pub fn itm_loss(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if n % 3 != 0 {
        candle_core::bail!("ITM logits have {n} rows, not 3·B");
    }
    cross_entropy_smoothed(logits, &itm_labels(n / 3), 0.0)
}
