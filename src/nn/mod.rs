//! Building blocks shared by the models: linear layers, layer norm, activations, attention,
//! patch embedding, the Q-Former attention masks and seeded initialisation.
//!
//! Linear layers, LayerNorm, softmax, the GELUs and attention run as our own fused CPU kernels
//! (`fused`, `fused_linear`, `fused_attention`, float32), which have a backward pass; elsewhere (other dtypes or devices) a block uses candle's fast ops only
//! when nothing it touches needs a gradient, and a differentiable composition of primitives when
//! something does (candle's fast ops have no backward: DESIGN.md §2, "Trap").

pub mod activation;
pub mod attention;
#[cfg(test)]
mod backprop_patch;
pub mod batch_norm;
pub mod checkpoint;
pub mod conv;
pub mod device;
mod few_rows;
pub mod frozen;
pub mod fused;
pub mod fused_attention;
#[cfg(feature = "cuda")]
pub(crate) mod fused_cuda;
pub mod fused_layer;
pub mod fused_linear;
pub mod fused_post_ln;
mod gemm;
pub mod host;
pub mod init;
pub mod layer_norm;
pub mod linear;
pub mod mask;
pub mod ops;
pub mod patch;
pub mod pool;
pub mod residual;
pub mod vecmath;

pub use activation::Activation;
pub use layer_norm::LayerNorm;
pub use linear::{linear, linear_no_bias, Linear};
