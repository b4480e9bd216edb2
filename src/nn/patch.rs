//! ViT patch embedding as a matmul: a stride-`p` convolution with kernel `p` (the `[hidden, C,
//! p, p]` weight HF checkpoints store) is the same arithmetic as flattening each patch and
//! multiplying, and this way no input gradient is computed for the pixels.

use candle_core::{Result, Tensor};

/// `[B, C, H, W]` pixels → `[B, g², hidden]` patch embeddings (no bias), `g = H / p`, patches in
/// the row-major order of the convolution output flattened; a remainder beyond `g·p` is dropped
/// as the convolution drops it.
pub fn embed_patches(pixels: &Tensor, weight: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, _) = pixels.dims4()?;
    let g = h / p;
    let hidden = weight.dim(0)?;
    let patches = pixels
        .narrow(2, 0, g * p)?
        .narrow(3, 0, g * p)?
        .reshape((b, c, g, p, g, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, g * g, c * p * p))?;
    patches.broadcast_matmul(&weight.reshape((hidden, c * p * p))?.t()?)
}
