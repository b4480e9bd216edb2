//! Multi-head scaled dot-product attention, the eager formula of transformers'
//! `eager_attention_forward` (models/clip/modeling_clip.py): softmax(q kᵀ · d^-½ + mask) v.

use candle_core::{DType, Result, Tensor};

use super::ops::softmax_last;

/// Additive mask value for a blocked position (HF uses the dtype's minimum, not -inf, so that a
/// fully blocked row gives a uniform rather than a NaN distribution).
pub const MASKED: f32 = f32::MIN;

/// `q`: `[B, Tq, H·d]`, `k` and `v`: `[B, Tk, H·d]`; `mask` is additive and broadcasts to
/// `[B, H, Tq, Tk]`. Returns `[B, Tq, H·d]`. On the CPU in float32 this is one fused kernel
/// forward and backward (fused_attention.rs); elsewhere [`composed`].
pub fn multi_head(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if super::fused_attention::supported(q) {
        super::fused_attention::attention(q, k, v, heads, mask)
    } else {
        composed(q, k, v, heads, mask)
    }
}

/// Self-attention over one packed projection `qkv` `[B, T, 3·H·d]` (q, k and v side by side
/// in each row); returns `[B, T, H·d]`. On the CPU in float32 one fused kernel reads the heads
/// in place and gives one gradient tensor back; elsewhere the thirds go to [`composed`].
pub fn packed(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    if super::fused_attention::supported(qkv) {
        return super::fused_attention::attention_packed(qkv, heads, mask);
    }
    let w = qkv.dim(2)? / 3;
    let third = |i: usize| qkv.narrow(2, i * w, w);
    composed(&third(0)?, &third(1)?, &third(2)?, heads, mask)
}

/// [`multi_head`] composed from candle ops: heads split into `[B, H, T, d]` copies, the score
/// and probability tensors `[B, H, Tq, Tk]` materialised (and kept for backward).
pub fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, tq, dim) = q.dims3()?;
    let tk = k.dim(1)?;
    let hd = dim / heads;
    let split = |x: &Tensor, t: usize| x.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
    // In mixed precision (bfloat16 q, k, v) the scores are scaled, masked and normalised in
    // float32, as under torch.autocast (softmax is on its float32 list); the probabilities go
    // back to v's type for the weighted sum.
    let scores = q.matmul(&k.t()?)?;
    let scale = (hd as f64).powf(-0.5);
    if let Some(p) = super::fused::attn_softmax_bf16(&scores, mask, scale)? {
        // bfloat16 on CUDA with the fused kernels: the same steps in one kernel each way.
        return p.matmul(&v)?.transpose(1, 2)?.reshape((b, tq, dim));
    }
    let scores = (scores.to_dtype(DType::F32)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    softmax_last(&scores)?
        .to_dtype(v.dtype())?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, tq, dim))
}
