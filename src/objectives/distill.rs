//! Momentum distillation's image–text contrastive loss (ALBEF, Li et al. 2021, §3.3 "Momentum
//! Distillation", `models/model_pretrain.py` `forward`; BLIP, Li et al. 2022,
//! `models/blip_retrieval.py`, for targets spread over captions of one image).
//!
//! The online features of a batch are compared with the batch's momentum features *and* the
//! queues of earlier momentum features (extra negatives); the targets mix the momentum model's
//! own softened similarities with the hard labels:
//!
//! - `sim_i2t = s · I [Tm; Tq]ᵀ`, `sim_t2i = s · T [Im; Iq]ᵀ` (`s` = exp(t), CLIP's learned
//!   scale; ALBEF's `1 / temp`),
//! - `targets = α · softmax(s · Im [Tm; Tq]ᵀ) + (1 − α) · hard` (and likewise for text),
//! - `loss = ½ (−mean_rows Σ log_softmax(sim_i2t) ⊙ targets_i2t − … t2i …)`.
//!
//! `hard` is one-hot on the diagonal (ALBEF) or, as BLIP, spread evenly over every column whose
//! image id equals the row's ([`hard_targets`]). With α = 0 and empty queues this is CLIP's
//! symmetric InfoNCE ([`super::contrastive::clip_loss`]).
//!
//! ALBEF computes the momentum similarities against the *momentum* features of the batch; the
//! online similarities compare online features with them too (`sim_i2t = image_feat @
//! text_feat_all`, where `text_feat_all` holds the momentum text features). Both are kept here.

use candle_core::{Result, Tensor};

use super::ops::log_softmax;
use crate::nn::ops::softmax_last;

/// Hard targets `[B, B + Q]` for rows with image ids `ids` against columns `[batch; queue]`:
/// each row spreads 1 evenly over the columns showing its image (BLIP's `pos_idx /
/// pos_idx.sum(1)`); with `same_image = false`, one-hot on the diagonal (ALBEF's
/// `fill_diagonal_(1)`). `queue_ids[k]` is `None` for a queue slot never filled (BLIP's −100).
pub fn hard_targets(
    ids: &[u64],
    queue_ids: &[Option<u64>],
    same_image: bool,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let (b, q) = (ids.len(), queue_ids.len());
    let cols: Vec<Option<u64>> = ids
        .iter()
        .map(|&i| Some(i))
        .chain(queue_ids.iter().copied())
        .collect();
    let mut w = vec![0f64; b * (b + q)];
    for (r, &id) in ids.iter().enumerate() {
        let row = &mut w[r * (b + q)..(r + 1) * (b + q)];
        if same_image {
            let hits: Vec<usize> = (0..b + q).filter(|&c| cols[c] == Some(id)).collect();
            for &c in &hits {
                row[c] = 1.0 / hits.len() as f64;
            }
        } else {
            row[r] = 1.0;
        }
    }
    Tensor::from_vec(w, (b, b + q), device)
}

/// The distilled targets `α · softmax(s · a bᵀ) + (1 − α) · hard` for the momentum features
/// `a` `[B, D]` against the columns `b` `[B + Q, D]` (no gradient: every input is detached).
pub fn soft_targets(
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    alpha: f64,
    hard: &Tensor,
) -> Result<Tensor> {
    let sim = (a.detach().matmul(&b.detach().t()?)? * scale)?;
    mix_targets(&sim, alpha, hard)
}

/// `α · softmax(sim_m) + (1 − α) · hard` for momentum similarities `sim_m` `[B, B + Q]` (already
/// temperature-scaled), detached.
pub fn mix_targets(sim_m: &Tensor, alpha: f64, hard: &Tensor) -> Result<Tensor> {
    let soft = softmax_last(&sim_m.detach())?;
    (soft * alpha)? + (hard.detach().to_dtype(sim_m.dtype())? * (1.0 - alpha))?
}

/// Soft-target cross-entropy `−Σ_c log_softmax(logits)_rc · targets_rc`, summed over rows and
/// divided by `rows` (the whole batch's row count: a micro-batch's share adds up to the mean).
pub fn soft_cross_entropy_sum(logits: &Tensor, targets: &Tensor, rows: usize) -> Result<Tensor> {
    log_softmax(logits)?.mul(targets)?.sum_all()? / -(rows as f64)
}

/// `½ (CE(sim_i2t, targets_i2t) + CE(sim_t2i, targets_t2i))`, each summed over these rows and
/// divided by the batch's `rows`: the distilled loss of any similarity (CLIP's scaled cosine,
/// the Q-Former's max over queries).
pub fn distilled_loss(
    sim_i2t: &Tensor,
    sim_t2i: &Tensor,
    targets_i2t: &Tensor,
    targets_t2i: &Tensor,
    rows: usize,
) -> Result<Tensor> {
    let i2t = soft_cross_entropy_sum(sim_i2t, targets_i2t, rows)?;
    let t2i = soft_cross_entropy_sum(sim_t2i, targets_t2i, rows)?;
    (i2t + t2i)? / 2.0
}

/// ALBEF's distilled image–text contrastive loss (`loss_ita`) over L2-normalised online
/// features `image`, `text` `[n, D]`, the columns they are compared with — `text_cols`
/// (`[Tm; Tq]`) and `image_cols` (`[Im; Iq]`), `[B + Q, D]` — the raw log scale `t` and the
/// targets of [`soft_targets`] for these rows. Each row depends on its own online feature only
/// (the columns are momentum features), so a batch split into micro-batches adds up exactly:
/// `rows` is the whole batch's row count B.
#[allow(clippy::too_many_arguments)]
pub fn distilled_itc_loss(
    image: &Tensor,
    text: &Tensor,
    image_cols: &Tensor,
    text_cols: &Tensor,
    logit_scale: &Tensor,
    targets_i2t: &Tensor,
    targets_t2i: &Tensor,
    rows: usize,
) -> Result<Tensor> {
    let s = logit_scale.exp()?;
    let sim_i2t = image.matmul(&text_cols.t()?)?.broadcast_mul(&s)?;
    let sim_t2i = text.matmul(&image_cols.t()?)?.broadcast_mul(&s)?;
    distilled_loss(&sim_i2t, &sim_t2i, targets_i2t, targets_t2i, rows)
}

/// ALBEF's α ramp: `alpha · min(1, step / warmup)` (ALBEF ramps over the first epoch,
/// `alpha * min(1, i / len(data_loader))`); `warmup = 0` is no ramp.
pub fn alpha_at(alpha: f64, warmup: u64, step: u64) -> f64 {
    if warmup == 0 {
        alpha
    } else {
        alpha * (step as f64 / warmup as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::contrastive::clip_loss;
    use candle_core::{DType, Device};

    /// With α = 0, no queue and unique ids, the distilled loss is CLIP's InfoNCE, and its
    /// columns may be the online features themselves.
    #[test]
    fn without_momentum_or_queue_it_is_infonce() {
        let dev = Device::Cpu;
        let img =
            crate::nn::ops::l2_normalize(&Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap()).unwrap();
        let txt =
            crate::nn::ops::l2_normalize(&Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap()).unwrap();
        let t = Tensor::new(1.7f32, &dev).unwrap();
        let hard = hard_targets(&[1, 2, 3, 4, 5], &[], true, &dev).unwrap();
        let ti = soft_targets(&img, &txt, 5.0, 0.0, &hard).unwrap();
        let tt = soft_targets(&txt, &img, 5.0, 0.0, &hard).unwrap();
        let a = distilled_itc_loss(&img, &txt, &img, &txt, &t, &ti, &tt, 5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = clip_loss(&img, &txt, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    /// BLIP's id targets: a row spreads over its image's columns (batch and queue); slots never
    /// filled match nothing; ALBEF's are the diagonal.
    #[test]
    fn hard_targets_spread_over_the_same_image() {
        let dev = Device::Cpu;
        let t = hard_targets(&[7, 8, 7], &[Some(8), None, Some(7)], true, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let third = 1.0 / 3.0;
        assert_eq!(t[0], vec![third, 0.0, third, 0.0, 0.0, third]);
        assert_eq!(t[1], vec![0.0, 0.5, 0.0, 0.5, 0.0, 0.0]);
        let d = hard_targets(&[7, 8, 7], &[Some(8), None, Some(7)], false, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(d[2], vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        let m = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap();
        let h = hard_targets(&[7, 8, 7], &[Some(8), None, Some(7)], true, &dev).unwrap();
        let t = soft_targets(&m, &c, 10.0, 0.4, &h).unwrap();
        for s in t
            .sum(candle_core::D::Minus1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
        {
            assert!((s - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn alpha_ramps_over_the_warmup() {
        assert_eq!(alpha_at(0.4, 0, 0), 0.4);
        assert_eq!(alpha_at(0.4, 100, 0), 0.0);
        assert!((alpha_at(0.4, 100, 50) - 0.2).abs() < 1e-12);
        assert_eq!(alpha_at(0.4, 100, 500), 0.4);
    }
}
