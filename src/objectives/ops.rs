//! Differentiable building blocks of the losses.

use candle_core::{Result, Tensor, D};

/// log softmax over the last dimension. The max is subtracted for stability and detached:
/// softmax is shift-invariant, so the gradient is unchanged and cheaper.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Mean cross-entropy of `[N, C]` logits against the diagonal (target i for row i, N = C).
pub fn cross_entropy_diagonal(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let eye = Tensor::eye(n, logits.dtype(), logits.device())?;
    log_softmax(logits)?.mul(&eye)?.sum_all()? / -(n as f64)
}

/// log σ(x) = −softplus(−x), computed as min(x, 0) − log(1 + e^−|x|) to stay finite.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_part = x.minimum(0.0)?;
    neg_part.sub(&(x.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// PyTorch's `F.cross_entropy(logits, targets, label_smoothing=ε)` for `[N, C]` logits, mean
/// over the rows whose target is `Some` (`None` is `ignore_index`): the target distribution is
/// `(1 − ε)·onehot + ε/C`.
pub fn cross_entropy_smoothed(
    logits: &Tensor,
    targets: &[Option<u32>],
    eps: f64,
) -> Result<Tensor> {
    let (sum, valid) = cross_entropy_smoothed_sum(logits, targets, eps)?;
    if valid == 0 {
        candle_core::bail!("cross-entropy over no targets (every row is ignored)");
    }
    sum / valid as f64
}

/// The numerator of [`cross_entropy_smoothed`] and its row count: the summed cross-entropy over
/// the rows whose target is `Some`. A batch split into shards divides each shard's sum by the
/// whole batch's count, so the shards' losses add up to the batch mean exactly.
pub fn cross_entropy_smoothed_sum(
    logits: &Tensor,
    targets: &[Option<u32>],
    eps: f64,
) -> Result<(Tensor, usize)> {
    let (n, c) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("{} targets for {n} rows of logits", targets.len());
    }
    let mut w = vec![0f64; n * c];
    let mut valid = 0usize;
    for (i, t) in targets.iter().enumerate() {
        let Some(t) = t else { continue };
        if *t as usize >= c {
            candle_core::bail!("target {t} of row {i} is not below the {c} classes");
        }
        valid += 1;
        for k in 0..c {
            w[i * c + k] = eps / c as f64;
        }
        w[i * c + *t as usize] += 1.0 - eps;
    }
    let w = Tensor::from_vec(w, (n, c), logits.device())?.to_dtype(logits.dtype())?;
    Ok((log_softmax(logits)?.mul(&w)?.sum_all()?.neg()?, valid))
}
