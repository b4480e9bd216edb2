//! Building blocks shared by the models: layer norm, activations, attention, masks.
//!
//! Every block has two paths. When gradients are needed (an input or a weight is tracked by
//! candle's autograd) it is a differentiable composition of primitive ops; otherwise it uses
//! candle's fused kernels, which are faster but have no backward (DESIGN.md §2, "Trap").

pub mod activation;
pub mod attention;
pub mod fused;
pub mod init;
pub mod layer_norm;
pub mod linear;
pub mod mask;
pub mod ops;
pub mod patch;

pub use activation::Activation;
pub use layer_norm::LayerNorm;
pub use linear::{linear, linear_no_bias, Linear};
