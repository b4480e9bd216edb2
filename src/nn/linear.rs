//! `y = x Wᵀ + b` with HF tensor names (`weight` `[out, in]`, `bias` `[out]`): on the CPU one
//! fused op (fused_linear.rs); elsewhere the input is flattened to 2-D for one matmul and the
//! bias added by the fused kernel so that its gradient is a single column sum.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer over existing tensors: `weight` `[out, in]`, `bias` `[out]` (a tied LM head is the
    /// token-embedding matrix).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (weight, bias), when the layer has a bias (what the fused blocks take).
    pub fn with_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.bias.as_ref().map(|b| (&self.weight, b))
    }
}

/// A linear layer with bias; initialisation as torch.nn.Linear (uniform ±1/√in).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let bias = vb.get_with_hints(
        out_dim,
        "bias",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Linear {
        weight,
        bias: Some(bias),
    })
}

/// A linear layer without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Linear { weight, bias: None })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused_linear::supported(x, &self.weight, self.bias.as_ref()) {
            return super::fused_linear::linear(x, &self.weight, self.bias.as_ref());
        }
        let dims = x.dims().to_vec();
        let k = *dims.last().expect("linear input has a last dimension");
        let rows = x.elem_count() / k.max(1);
        // A frozen weight (no gradient path) contributes no weight-gradient gemm to backward.
        let y = super::frozen::matmul_t(&x.contiguous()?.reshape((rows, k))?, &self.weight)?;
        let y = match &self.bias {
            Some(b) if super::fused::supported(&y) => super::fused::add_bias(&y, b)?,
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.weight.dim(0)?;
        y.reshape(out)
    }
}
