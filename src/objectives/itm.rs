//! BLIP-2's image–text matching objective (Li et al. 2023, §3.2 "ITM"; LAVIS
//! `blip2_qformer.py`): each image gets one hard-negative text and each text one hard-negative
//! image, drawn from the softmax of the ITC similarities with the positives masked out; the
//! batch is positives + both negative sets, labelled 1, 0, 0; cross-entropy on the 2-way head.

use candle_core::{Result, Tensor};
use rand::Rng;

use super::ops::{cross_entropy_smoothed, cross_entropy_smoothed_sum};

/// Hard negatives for a square `[B, B]` similarity (row i = image i, column j = text j; the
/// temperature-scaled ITC logits, no gradient needed). Returns `(text_for_image, image_for_text)`:
/// for image i a text index ≠ i, drawn with probability softmax over j ≠ i of `sim[i, j]`; for
/// text j an image index ≠ j, drawn from softmax over i ≠ j of `sim[i, j]` (LAVIS masks the
/// diagonal with −10000 before the softmax, i.e. exactly these distributions).
pub fn sample_hard_negatives<R: Rng>(
    sim: &Tensor,
    rng: &mut R,
) -> Result<(Vec<usize>, Vec<usize>)> {
    sample_hard_negatives_excluding(sim, &|_, _| false, rng)
}

/// [`sample_hard_negatives`] that also never draws a pair `(image i, text j)` for which
/// `matches(i, j)` holds: LAVIS masks every pair sharing an `image_id` this way
/// (`blip2_qformer.py`), so that a caption true of an image is never labelled a non-match. A
/// row left with no admissible index falls back to masking the diagonal alone.
pub fn sample_hard_negatives_excluding<R: Rng>(
    sim: &Tensor,
    matches: &dyn Fn(usize, usize) -> bool,
    rng: &mut R,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let s: Vec<Vec<f32>> = crate::nn::host::rows(sim)?;
    let b = s.len();
    if b < 2 || s.iter().any(|r| r.len() != b) {
        candle_core::bail!("hard negatives need a square similarity with at least 2 rows, got {b}");
    }
    let draw = |rng: &mut R, row: &dyn Fn(usize) -> f32, excluded: &dyn Fn(usize) -> bool, own| {
        let only_own = |k: usize| k == own;
        let excluded: &dyn Fn(usize) -> bool = if (0..b).all(excluded) {
            &only_own
        } else {
            excluded
        };
        let w = negative_weights_excluding(b, row, excluded);
        let mut u: f64 = rng.random::<f64>();
        for (k, &p) in w.iter().enumerate() {
            if !excluded(k) && u < p {
                return k;
            }
            u -= p;
        }
        // Rounding left a sliver: take the last admissible index.
        (0..b).rev().find(|&k| !excluded(k)).expect("b >= 2")
    };
    let text_for_image = (0..b)
        .map(|i| draw(rng, &|j| s[i][j], &|j| j == i || matches(i, j), i))
        .collect();
    let image_for_text = (0..b)
        .map(|j| draw(rng, &|i| s[i][j], &|i| i == j || matches(i, j), j))
        .collect();
    Ok((text_for_image, image_for_text))
}

/// softmax over k ≠ `skip` of `row(k)` (0 at `skip`), in f64.
pub fn negative_weights(b: usize, row: &dyn Fn(usize) -> f32, skip: usize) -> Vec<f64> {
    negative_weights_excluding(b, row, &|k| k == skip)
}

/// softmax of `row(k)` over the k not `excluded` (0 where excluded), in f64.
pub fn negative_weights_excluding(
    b: usize,
    row: &dyn Fn(usize) -> f32,
    excluded: &dyn Fn(usize) -> bool,
) -> Vec<f64> {
    let max = (0..b)
        .filter(|&k| !excluded(k))
        .map(|k| row(k) as f64)
        .fold(f64::MIN, f64::max);
    let e: Vec<f64> = (0..b)
        .map(|k| {
            if excluded(k) {
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

/// Summed cross-entropy of ITM logits `[N, 2]` against per-row labels (1 = match): a shard's
/// share of [`itm_loss`] once divided by the whole batch's 3B rows.
pub fn itm_loss_sum(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let targets: Vec<Option<u32>> = labels.iter().map(|&l| Some(l)).collect();
    Ok(cross_entropy_smoothed_sum(logits, &targets, 0.0)?.0)
}
