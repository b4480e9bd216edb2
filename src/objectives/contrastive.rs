//! Image–text contrastive losses over a batch of matching pairs (pair i is image i, text i).
//!
//! - [`clip_loss`]: CLIP's symmetric InfoNCE (Radford et al. 2021, §2.5 and Fig. 3; open_clip
//!   `loss.py` `ClipLoss`): logits = exp(t) · I Tᵀ over L2-normalised features, cross-entropy of
//!   each image over the texts and each text over the images, averaged.
//! - [`siglip_loss`]: SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Alg. 1; open_clip
//!   `SigLipLoss`): −Σᵢⱼ log σ(zᵢⱼ (exp(t) xᵢ·yⱼ + b)) / n with zᵢⱼ = 1 on the diagonal, −1 off it.
//!
//! Both take features that are already L2-normalised and the raw learned log scale `t` (a
//! scalar tensor, so that its gradient flows); the caller clamps `t` to [0, ln 100] after each
//! optimiser step, as CLIP and open_clip do.

use candle_core::{Result, Tensor};

use super::ops::{cross_entropy_diagonal, log_sigmoid, log_softmax};

/// Initial log temperature of CLIP, ln(1/0.07).
pub const CLIP_LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778;
/// CLIP caps the temperature at 100: t ≤ ln 100.
pub const CLIP_LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;
/// SigLIP's initial log temperature, ln 10, and bias, −10.
pub const SIGLIP_LOGIT_SCALE_INIT: f64 = std::f64::consts::LN_10;
pub const SIGLIP_LOGIT_BIAS_INIT: f64 = -10.0;

/// Which contrastive loss a CLIP trains with (`train.loss` in a config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ContrastiveLoss {
    /// CLIP's symmetric InfoNCE ([`clip_loss`]).
    #[default]
    #[serde(rename = "infonce")]
    InfoNce,
    /// SigLIP's pairwise sigmoid loss ([`siglip_loss`]), with a learned bias.
    #[serde(rename = "siglip")]
    SigLip,
}

impl ContrastiveLoss {
    /// The initial log temperature: ln(1/0.07) for InfoNCE, ln 10 for SigLIP.
    pub fn logit_scale_init(self) -> f64 {
        match self {
            ContrastiveLoss::InfoNce => CLIP_LOGIT_SCALE_INIT,
            ContrastiveLoss::SigLip => SIGLIP_LOGIT_SCALE_INIT,
        }
    }

    /// The initial logit bias, for the losses that learn one.
    pub fn logit_bias_init(self) -> Option<f64> {
        match self {
            ContrastiveLoss::InfoNce => None,
            ContrastiveLoss::SigLip => Some(SIGLIP_LOGIT_BIAS_INIT),
        }
    }

    /// The loss over L2-normalised `[B, D]` features; `logit_bias` is required by SigLIP.
    pub fn loss(
        self,
        image: &Tensor,
        text: &Tensor,
        logit_scale: &Tensor,
        logit_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            ContrastiveLoss::InfoNce => clip_loss(image, text, logit_scale),
            ContrastiveLoss::SigLip => match logit_bias {
                Some(b) => siglip_loss(image, text, logit_scale, b),
                None => candle_core::bail!("the SigLIP loss needs a logit bias"),
            },
        }
    }
}

/// `exp(t) · I Tᵀ`: `[B_img, B_txt]`.
pub fn logits(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    image.matmul(&text.t()?)?.broadcast_mul(&logit_scale.exp()?)
}

/// Symmetric InfoNCE; `image` and `text` are `[B, D]` and L2-normalised.
pub fn clip_loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let per_image = logits(image, text, logit_scale)?;
    let per_text = per_image.t()?;
    (cross_entropy_diagonal(&per_image)? + cross_entropy_diagonal(&per_text)?)? / 2.0
}

/// Sigmoid loss with learned bias `logit_bias` (scalar).
pub fn siglip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Result<Tensor> {
    let n = image.dim(0)?;
    let l = logits(image, text, logit_scale)?.broadcast_add(logit_bias)?;
    // z = 2·I − 1: +1 for the matching pairs, −1 for every other pair.
    let z = ((Tensor::eye(n, l.dtype(), l.device())? * 2.0)? - 1.0)?;
    log_sigmoid(&l.mul(&z)?)?.sum_all()? / -(n as f64)
}

/// This rank's part of a contrastive loss over a batch spread across ranks (open_clip
/// `ClipLoss(local_loss=True)`, `SigLipLoss`): the rows this rank holds (`rows_*`, global batch
/// positions `offset..offset + rows`) against every column of the global batch (`cols_*`,
/// `n_global` rows), divided by `n_global` so that the parts of all ranks add up to the
/// whole-batch loss ([`ContrastiveLoss::loss`]). `rows_text` is unused by SigLIP, whose loss is
/// a sum over pairs and so needs only the image rows.
#[allow(clippy::too_many_arguments)]
pub fn loss_rows(
    loss: ContrastiveLoss,
    rows_image: &Tensor,
    rows_text: &Tensor,
    cols_image: &Tensor,
    cols_text: &Tensor,
    offset: usize,
    logit_scale: &Tensor,
    logit_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let n_global = cols_image.dim(0)?;
    let rows = rows_image.dim(0)?;
    if offset + rows > n_global || cols_text.dim(0)? != n_global {
        candle_core::bail!(
            "rows {offset}..{} of a batch of {n_global} images and {} texts",
            offset + rows,
            cols_text.dim(0)?
        );
    }
    // The one-hot of row i's matching column, offset + i.
    let mut hot = vec![0f32; rows * n_global];
    for i in 0..rows {
        hot[i * n_global + offset + i] = 1.0;
    }
    let hot = Tensor::from_vec(hot, (rows, n_global), rows_image.device())?
        .to_dtype(rows_image.dtype())?;
    match loss {
        ContrastiveLoss::InfoNce => {
            let per_image = logits(rows_image, cols_text, logit_scale)?;
            let per_text = logits(rows_text, cols_image, logit_scale)?;
            let ce = |l: &Tensor| log_softmax(l)?.mul(&hot)?.sum_all();
            (ce(&per_image)? + ce(&per_text)?)? / -(2.0 * n_global as f64)
        }
        ContrastiveLoss::SigLip => {
            let Some(b) = logit_bias else {
                candle_core::bail!("the SigLIP loss needs a logit bias")
            };
            let l = logits(rows_image, cols_text, logit_scale)?.broadcast_add(b)?;
            let z = ((hot * 2.0)? - 1.0)?;
            log_sigmoid(&l.mul(&z)?)?.sum_all()? / -(n_global as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Loss at perfect, confident alignment is ~0; at chance it is ln B.
    #[test]
    fn clip_loss_limits() {
        let dev = Device::Cpu;
        let eye = Tensor::eye(4, DType::F64, &dev).unwrap();
        let big = Tensor::new(10f64, &dev).unwrap();
        let l = clip_loss(&eye, &eye, &big)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(l < 1e-3, "{l}");
        let same = Tensor::ones((4, 4), DType::F64, &dev).unwrap();
        let zero = Tensor::new(0f64, &dev).unwrap();
        let l = clip_loss(&same, &same, &zero)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 4f64.ln()).abs() < 1e-12, "{l}");
    }

    /// Gradients by central finite differences in float64.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let img = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let txt = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let t = Var::new(1.3f64, &dev).unwrap();
        let b = Var::new(-2.0f64, &dev).unwrap();
        type LossFn = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Tensor>;
        let losses: [LossFn; 2] = [
            |i, x, t, _| clip_loss(i, x, t),
            |i, x, t, b| siglip_loss(i, x, t, b),
        ];
        for f in losses {
            let loss = f(&img, &txt, &t, &b).unwrap();
            let grads = loss.backward().unwrap();
            let eval = |i: &Tensor, x: &Tensor, t: &Tensor, b: &Tensor| {
                f(i, x, t, b).unwrap().to_scalar::<f64>().unwrap()
            };
            let h = 1e-6;
            // Every element of both feature matrices, and the scalars.
            for (v, which) in [(&img, 0), (&txt, 1)] {
                let g = grads
                    .get(v)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let base = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                for k in 0..base.len() {
                    let shifted = |d: f64| {
                        let mut x = base.clone();
                        x[k] += d;
                        Tensor::from_vec(x, (3, 5), &dev).unwrap()
                    };
                    let (p, m) = (shifted(h), shifted(-h));
                    let num = if which == 0 {
                        (eval(&p, &txt, &t, &b) - eval(&m, &txt, &t, &b)) / (2.0 * h)
                    } else {
                        (eval(&img, &p, &t, &b) - eval(&img, &m, &t, &b)) / (2.0 * h)
                    };
                    assert!(
                        (num - g[k]).abs() < 1e-6,
                        "feature grad {k}: {num} vs {}",
                        g[k]
                    );
                }
            }
            let gt = grads.get(&t).unwrap().to_scalar::<f64>().unwrap();
            let s = |d: f64| Tensor::new(1.3 + d, &dev).unwrap();
            let num = (eval(&img, &txt, &s(h), &b) - eval(&img, &txt, &s(-h), &b)) / (2.0 * h);
            assert!((num - gt).abs() < 1e-6, "scale grad {num} vs {gt}");
        }
    }

    /// The row parts of a batch split three ways add up to the whole-batch loss, and so do their
    /// gradients (with respect to rows and columns together), for both losses.
    #[test]
    fn row_parts_add_up_to_the_batch_loss() {
        let dev = Device::Cpu;
        let img = Tensor::randn(0f64, 1.0, (7, 4), &dev).unwrap();
        let txt = Tensor::randn(0f64, 1.0, (7, 4), &dev).unwrap();
        let t = Var::new(1.1f64, &dev).unwrap();
        let b = Var::new(-1.5f64, &dev).unwrap();
        for loss in [ContrastiveLoss::InfoNce, ContrastiveLoss::SigLip] {
            let (vi, vt) = (
                Var::from_tensor(&img).unwrap(),
                Var::from_tensor(&txt).unwrap(),
            );
            let whole = loss.loss(&vi, &vt, &t, Some(&b)).unwrap();
            let g_whole = whole.backward().unwrap();
            let mut sum = 0f64;
            let zeros = || Tensor::zeros((7, 4), DType::F64, &dev).unwrap();
            let (mut g_img, mut g_txt) = (zeros(), zeros());
            let mut g_scale = 0f64;
            for part in [0..2usize, 2..3, 3..7] {
                let (ri, rt) = (
                    Var::from_tensor(&img.narrow(0, part.start, part.len()).unwrap()).unwrap(),
                    Var::from_tensor(&txt.narrow(0, part.start, part.len()).unwrap()).unwrap(),
                );
                let (ci, ct) = (
                    Var::from_tensor(&img).unwrap(),
                    Var::from_tensor(&txt).unwrap(),
                );
                let l = loss_rows(loss, &ri, &rt, &ci, &ct, part.start, &t, Some(&b)).unwrap();
                sum += l.to_scalar::<f64>().unwrap();
                let g = l.backward().unwrap();
                // A row's gradient in its place, plus the columns' (SigLIP uses no text rows
                // and no image columns).
                let placed = |v: &Var| match g.get(v) {
                    Some(x) => zeros().slice_assign(&[part.clone(), 0..4], x).unwrap(),
                    None => zeros(),
                };
                let whole_of = |v: &Var| g.get(v).cloned().unwrap_or_else(zeros);
                g_img = (g_img + placed(&ri) + whole_of(&ci)).unwrap();
                g_txt = (g_txt + placed(&rt) + whole_of(&ct)).unwrap();
                g_scale += g.get(&t).unwrap().to_scalar::<f64>().unwrap();
            }
            let w = whole.to_scalar::<f64>().unwrap();
            assert!((sum - w).abs() < 1e-12, "{loss:?}: {sum} vs {w}");
            for (got, v) in [(g_img, &vi), (g_txt, &vt)] {
                let diff = (got - g_whole.get(v).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(diff < 1e-12, "{loss:?} feature gradient off by {diff}");
            }
            let gs = g_whole.get(&t).unwrap().to_scalar::<f64>().unwrap();
            assert!((g_scale - gs).abs() < 1e-12, "{loss:?}: {g_scale} vs {gs}");
        }
        let e = Tensor::zeros((2, 4), DType::F64, &dev).unwrap();
        assert!(loss_rows(ContrastiveLoss::InfoNce, &e, &e, &img, &txt, 6, &t, None).is_err());
    }
}
