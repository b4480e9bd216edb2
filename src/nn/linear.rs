//! `y = x Wᵀ + b` with HF tensor names (`weight` `[out, in]`, `bias` `[out]`): on the CPU one
//! fused op (fused_linear.rs); elsewhere the input is flattened to 2-D for one matmul and the
//! bias added by the fused kernel so that its gradient is a single column sum. A frozen weight
//! on the CPU is stored transposed ([`frozen_layout`]).

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

    /// Whether the weight is a frozen float32 one stored transposed on the CPU
    /// ([`frozen_layout`]).
    pub fn is_stored_transposed(&self) -> bool {
        let w = &self.weight;
        !w.track_op()
            && w.device().is_cpu()
            && w.dtype() == candle_core::DType::F32
            && super::fused_linear::transposed(w.layout())
    }

    /// (weight, bias), when the layer has a bias (what the fused blocks take).
    pub fn with_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.bias.as_ref().map(|b| (&self.weight, b))
    }
}

/// A weight that no gradient reaches (an inference model; BLIP-2's frozen LM), float32 on the
/// CPU, stored transposed: `[in, out]` row-major, seen as `[out, in]` through its strides. The
/// `gemm` crate then streams `Wᵀ` as it lies instead of packing it from a transpose: a whole
/// ViT-B/32 embedding (batch 8, weights read from memory) 22% faster on a 2-core Xeon, and a
/// batch-8 decode of SmolLM2 15% (`vlalign bench`; on one cache-resident weight the two layouts
/// are within ±20% of each other there, while on a 2-core EPYC `Wᵀ` row-major ran 180–210
/// against 80–115 GFLOP/s for 400 rows, 768 → 768). Inference forms only that product; the
/// input gradient `dy W` through a frozen weight (the LM in BLIP-2 stage 2) then reads `W`
/// through a transpose instead (the stage-2 step measured level). The copy replaces the loaded
/// weight, so a model built from tensors held elsewhere as well is built inside
/// [`keeping_layout`].
fn frozen_layout(w: Tensor) -> Result<Tensor> {
    let cpu_f32 = w.device().is_cpu() && w.dtype() == candle_core::DType::F32;
    let keep = KEEP_LAYOUT.with(|k| k.get());
    if keep || w.track_op() || !cpu_f32 || w.rank() != 2 || !w.is_contiguous() {
        return Ok(w);
    }
    w.t()?.contiguous()?.t()
}

thread_local! {
    /// Set inside [`keeping_layout`].
    static KEEP_LAYOUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `build` (a model constructor) with frozen weights kept as they come, not transposed
/// ([`frozen_layout`]): for a model whose frozen tensors stay held elsewhere too — a training
/// task's frozen image encoder, kept to be saved with the model — where a transposed copy
/// would hold each weight twice for as long as the model lives.
pub fn keeping_layout<T>(build: impl FnOnce() -> T) -> T {
    /// Restores the flag however `build` ends.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            KEEP_LAYOUT.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(KEEP_LAYOUT.with(|k| k.replace(true)));
    build()
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
        weight: frozen_layout(weight)?,
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
    Ok(Linear {
        weight: frozen_layout(weight)?,
        bias: None,
    })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != self.weight.dtype() {
            // Mixed precision (`train.precision = "bf16"`): the product runs in the input's float
            // type, the weight and bias cast to it. The cast is differentiable: the gradient
            // reaches the float32 master weight as float32.
            let cast = |t: &Tensor| t.to_dtype(x.dtype());
            let bias = self.bias.as_ref().map(cast).transpose()?;
            return Linear::new(cast(&self.weight)?, bias).forward(x);
        }
        if super::fused_linear::supported(x, &self.weight, self.bias.as_ref()) {
            return super::fused_linear::linear(x, &self.weight, self.bias.as_ref());
        }
        let dims = x.dims().to_vec();
        let k = *dims.last().expect("linear input has a last dimension");
        let rows = x.elem_count() / k.max(1);
        // A frozen weight (no gradient path) contributes no weight-gradient gemm to backward.
        let y = super::frozen::matmul_t(&x.contiguous()?.reshape((rows, k))?, &self.weight)?;
        let y = match &self.bias {
            Some(b) if super::fused::supported_elementwise(&y) && b.dtype() == y.dtype() => {
                super::fused::add_bias(&y, b)?
            }
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// A plain (frozen) weight is stored transposed with the same values and gives the same
    /// output; inside `keeping_layout` it is kept as loaded; a trainable one is never moved.
    #[test]
    fn frozen_weights_are_stored_transposed_unless_kept() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let tensors = || {
            HashMap::from([
                ("weight".to_string(), w.clone()),
                ("bias".to_string(), b.clone()),
            ])
        };
        let vb = || VarBuilder::from_tensors(tensors(), DType::F32, &dev);
        let frozen = linear(4, 6, vb()).unwrap();
        assert!(!frozen.weight().is_contiguous());
        let diff = |a: &Tensor, c: &Tensor| {
            (a - c)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(frozen.weight(), &w), 0.0);
        let kept = keeping_layout(|| linear(4, 6, vb())).unwrap();
        assert!(kept.weight().is_contiguous());
        let expect = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        for l in [&frozen, &kept] {
            assert!(diff(&l.forward(&x).unwrap(), &expect) < 1e-6);
        }
        let varmap = candle_nn::VarMap::new();
        let trained = linear(4, 6, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        assert!(trained.weight().is_contiguous());
    }
}
