//! Ops that pick candle's fused kernel for inference and a differentiable composition for training.

use candle_core::{Result, Tensor, D};

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
