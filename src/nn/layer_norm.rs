//! LayerNorm over the last dimension with HF tensor names (`weight`, `bias`).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Module, VarBuilder};

use super::ops::needs_grad;

/// `y = (x - mean) / sqrt(var + eps) * weight + bias`, biased variance as torch.nn.LayerNorm.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias` of shape `[dim]` (initialised to 1 and 0).
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// Over given tensors (`[dim]` each).
    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The LayerNorm of `x` cast to `out` when given (mixed precision: normalised in `x`'s
    /// type, the result in the products' type). Float32 into bfloat16 on CUDA with the fused
    /// kernels is one kernel each way (`fused::layer_norm_bf16`) instead of a LayerNorm and a
    /// cast.
    pub fn forward_as(&self, x: &Tensor, out: Option<DType>) -> Result<Tensor> {
        use super::fused::{layer_norm_bf16, layer_norm_bf16_supported};
        match out {
            Some(DType::BF16)
                if self.weight.dtype() == DType::F32 && layer_norm_bf16_supported(x) =>
            {
                layer_norm_bf16(x, &self.weight, &self.bias, self.eps)
            }
            _ => super::ops::cast_to(&self.forward(x)?, out),
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.dtype() != x.dtype() {
            // Weights stored in another float type (a frozen LM loaded in bfloat16): normalised
            // in the input's type, the weights cast to it.
            let cast = |t: &Tensor| t.to_dtype(x.dtype());
            return Self::from_tensors(cast(&self.weight)?, cast(&self.bias)?, self.eps).forward(x);
        }
        if super::fused::supported(x) {
            return super::fused::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        if !needs_grad(&[x, &self.weight, &self.bias]) && x.dtype() == DType::F32 {
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            );
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}
