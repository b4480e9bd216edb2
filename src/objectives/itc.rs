//! BLIP-2's image–text contrastive objective (Li et al. 2023, §3.2 "ITC"; LAVIS
//! `blip2_qformer.py` `forward`): the image–text similarity is the highest over the queries of
//! query feature · [CLS] text feature; a learned temperature scales it and the loss is the
//! symmetric cross-entropy with label smoothing 0.1.

use candle_core::{Result, Tensor, D};

use super::ops::{cross_entropy_smoothed, cross_entropy_smoothed_sum};

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

/// This rank's part of [`itc_loss`] when the batch is spread over ranks (LAVIS gathers the
/// features of every rank and computes its own rows against all of them): `rows_*` are this
/// rank's samples, row k's match is column `targets[k]` of the whole batch `cols_*`; the sums
/// are divided by the whole batch's size, so the parts of all ranks add up to [`itc_loss`].
pub fn itc_loss_rows(
    rows_image: &Tensor,
    rows_text: &Tensor,
    cols_image: &Tensor,
    cols_text: &Tensor,
    targets: &[usize],
    temp: &Tensor,
) -> Result<Tensor> {
    let n = cols_image.dim(0)?;
    if cols_text.dim(0)? != n || targets.iter().any(|&t| t >= n) {
        candle_core::bail!(
            "ITC rows {targets:?} of a batch of {n} images and {} texts",
            cols_text.dim(0)?
        );
    }
    let i2t = max_over_queries(rows_image, cols_text)?.broadcast_div(temp)?;
    let t2i = max_over_queries(cols_image, rows_text)?
        .t()?
        .broadcast_div(temp)?;
    let t: Vec<Option<u32>> = targets.iter().map(|&x| Some(x as u32)).collect();
    let (a, _) = cross_entropy_smoothed_sum(&i2t, &t, LABEL_SMOOTHING)?;
    let (b, _) = cross_entropy_smoothed_sum(&t2i, &t, LABEL_SMOOTHING)?;
    (a + b)? / (2.0 * n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Rows split in two interleaved parts add up to the batch loss, gradients included.
    #[test]
    fn row_parts_add_up_to_itc() {
        let dev = Device::Cpu;
        let img = Tensor::randn(0f64, 1.0, (5, 3, 4), &dev).unwrap();
        let txt = Tensor::randn(0f64, 1.0, (5, 4), &dev).unwrap();
        let temp = Var::new(0.3f64, &dev).unwrap();
        let (vi, vt) = (
            Var::from_tensor(&img).unwrap(),
            Var::from_tensor(&txt).unwrap(),
        );
        let whole = itc_loss(&vi, &vt, &temp).unwrap();
        let gw = whole.backward().unwrap();
        let (mut sum, mut g_temp) = (0f64, 0f64);
        let mut g_img = Tensor::zeros((5, 3, 4), DType::F64, &dev).unwrap();
        for part in [vec![0usize, 3], vec![1, 2, 4]] {
            let idx =
                Tensor::new(part.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev).unwrap();
            let ri = Var::from_tensor(&img.index_select(&idx, 0).unwrap()).unwrap();
            let rt = Var::from_tensor(&txt.index_select(&idx, 0).unwrap()).unwrap();
            let (ci, ct) = (
                Var::from_tensor(&img).unwrap(),
                Var::from_tensor(&txt).unwrap(),
            );
            let l = itc_loss_rows(&ri, &rt, &ci, &ct, &part, &temp).unwrap();
            sum += l.to_scalar::<f64>().unwrap();
            let g = l.backward().unwrap();
            let rows = Tensor::zeros((5, 3, 4), DType::F64, &dev)
                .unwrap()
                .index_add(&idx, g.get(&ri).unwrap(), 0)
                .unwrap();
            g_img = (g_img + rows + g.get(&ci).unwrap()).unwrap();
            g_temp += g.get(&temp).unwrap().to_scalar::<f64>().unwrap();
        }
        let w = whole.to_scalar::<f64>().unwrap();
        assert!((sum - w).abs() < 1e-12, "{sum} vs {w}");
        let d = (g_img - gw.get(&vi).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "image gradient off by {d}");
        let gt = gw.get(&temp).unwrap().to_scalar::<f64>().unwrap();
        assert!((g_temp - gt).abs() < 1e-12, "{g_temp} vs {gt}");
        assert!(itc_loss_rows(&vi, &vt, &vi, &vt, &[0, 9], &temp).is_err());
    }
}
