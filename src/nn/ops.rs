//! Ops that pick candle's fused kernel for inference and a differentiable composition for training.

use candle_core::{DType, Result, Tensor, D};

/// True when autograd tracks any of `ts`: the fused fast ops would silently drop its gradient.
pub fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Softmax over the last dimension.
pub fn softmax_last(xs: &Tensor) -> Result<Tensor> {
    if super::fused::supported(xs) {
        return super::fused::softmax_last(xs);
    }
    if needs_grad(&[xs]) {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// Row-wise L2 normalisation over the last dimension, `x / ||x||` as transformers and open_clip do.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    xs.broadcast_div(&norm)
}

/// Errors when `t` holds a NaN or an infinity, naming `what`: a non-finite result is never
/// printed, ranked or saved (a NaN compares false with everything, so a ranking that counts
/// better-scored candidates would call it perfect).
pub fn ensure_finite(t: &Tensor, what: &str) -> crate::error::Result<()> {
    ensure_each_finite(&[t], |_| what.to_string())
}

/// [`ensure_finite`] for several tensors with one host read: the error names the first bad
/// tensor `what(i)` (the names are built only then).
pub fn ensure_each_finite(
    ts: &[&Tensor],
    what: impl Fn(usize) -> String,
) -> crate::error::Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let counts = ts
        .iter()
        .map(|t| {
            // 0·x is 0 where x is finite and NaN where it is NaN or ±inf; NaN ≠ NaN.
            let d = (*t * 0.0)?;
            d.ne(&d)?.to_dtype(DType::F32)?.sum_all()
        })
        .collect::<Result<Vec<_>>>()?;
    let bad: Vec<f32> = super::host::flat(&Tensor::stack(&counts, 0)?)?;
    match bad.iter().position(|&b| b > 0.0) {
        Some(i) => Err(non_finite(&what(i), bad[i] as usize, ts[i].elem_count())),
        None => Ok(()),
    }
}

/// [`ensure_finite`] for values already on the host (a decode step's logit rows): the check
/// costs one pass and no tensor ops.
pub fn ensure_finite_rows(rows: &[Vec<f32>], what: &str) -> crate::error::Result<()> {
    let bad = rows.iter().flatten().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Err(non_finite(what, bad, rows.iter().map(Vec::len).sum()));
    }
    Ok(())
}

fn non_finite(what: &str, bad: usize, total: usize) -> crate::error::Error {
    crate::error::Error::NonFinite(format!(
        "{what}: {bad} of {total} values are NaN or infinite (corrupt weights, a bad config value \
         such as layer_norm_eps or rescale_factor, or a diverged model)"
    ))
}

/// Mixed precision: the float type `compute` a block's products run in, when it is set and
/// differs from its input `x`'s; `None` when the block runs in `x`'s own type.
pub fn mixed_dtype(compute: Option<DType>, x: &Tensor) -> Option<DType> {
    compute.filter(|&c| c != x.dtype())
}

/// `t` in `dtype` (a differentiable cast), or `t` itself with none.
pub fn cast_to(t: &Tensor, dtype: Option<DType>) -> Result<Tensor> {
    dtype.map_or(Ok(t.clone()), |d| t.to_dtype(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn non_finite_results_are_errors() {
        let dev = Device::Cpu;
        assert!(ensure_finite(&Tensor::new(&[1f32, -3e38, 0.0], &dev).unwrap(), "x").is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[[1f32, bad], [2.0, 3.0]], &dev).unwrap();
            let e = ensure_finite(&t, "scores").unwrap_err().to_string();
            assert!(e.starts_with("scores: 1 of 4 values"), "{e}");
            let rows = vec![vec![1f32, bad], vec![2.0, 3.0]];
            let e = ensure_finite_rows(&rows, "logits").unwrap_err().to_string();
            assert!(e.starts_with("logits: 1 of 4 values"), "{e}");
        }
        assert!(ensure_finite_rows(&[vec![1f32, -3e38]], "x").is_ok());
    }
}
