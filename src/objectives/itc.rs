//! BLIP-2's image–text contrastive objective (Li et al. 2023, §3.2 "ITC"; LAVIS
//! `blip2_qformer.py` `forward`): the image–text similarity is the highest over the queries of
//! query feature · [CLS] text feature; a learned temperature scales it and the loss is the
//! symmetric cross-entropy with label smoothing 0.1.

use candle_core::{Result, Tensor, D};

use super::ops::cross_entropy_smoothed;

/// Initial temperature (LAVIS `self.temp = 0.07`).
pub const TEMP_INIT: f64 = 0.07;
/// The temperature is kept in `[TEMP_MIN, TEMP_MAX]` after every optimiser step (BLIP/ALBEF's
/// `temp.clamp_(0.001, 0.5)`).
pub const TEMP_MIN: f64 = 0.001;
pub const TEMP_MAX: f64 = 0.5;
/// Label smoothing of the ITC and ITG cross-entropies (LAVIS).
pub const LABEL_SMOOTHING: f64 = 0.1;

/// `[Bi, Bt]` similarity: for image i and text j, the max over queries q of
/// `image[i, q] · text[j]`. `image`: `[Bi, Q, D]`, `text`: `[Bt, D]` (both L2-normalised, so this
/// is HF `Blip2ForImageTextRetrieval`'s ITC score: cosine, no temperature).
pub fn max_over_queries(image: &Tensor, text: &Tensor) -> Result<Tensor> {
    let (bi, q, d) = image.dims3()?;
    let per_query = image.reshape((bi * q, d))?.matmul(&text.t()?)?; // [Bi·Q, Bt]
    per_query.reshape((bi, q, text.dim(0)?))?.max(1)
}

/// The ITC loss: `sim = max_over_queries / temp`, then
/// `(CE(sim, diag) + CE(simᵀ, diag)) / 2`, both with label smoothing 0.1.
pub fn itc_loss(image: &Tensor, text: &Tensor, temp: &Tensor) -> Result<Tensor> {
    let sim = max_over_queries(image, text)?.broadcast_div(temp)?;
    let n = sim.dim(0)?;
    if n != sim.dim(D::Minus1)? {
        candle_core::bail!(
            "ITC needs as many images as texts, got {n} and {}",
            sim.dim(1)?
        );
    }
    let targets: Vec<Option<u32>> = (0..n as u32).map(Some).collect();
    let i2t = cross_entropy_smoothed(&sim, &targets, LABEL_SMOOTHING)?;
    let t2i = cross_entropy_smoothed(&sim.t()?, &targets, LABEL_SMOOTHING)?;
    (i2t + t2i)? / 2.0
}
