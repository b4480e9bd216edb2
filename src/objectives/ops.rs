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
