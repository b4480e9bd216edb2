//! `x Wᵀ` against a frozen weight — a plain tensor that no gradient reaches — when `x` itself
//! needs a gradient (BLIP-2 stage 2: the frozen LM between the trained projection and the loss,
//! BLIP-2 §3.3). candle's matmul backward always forms the weight's gradient `dyᵀ x` too, a third
//! of the LM's gemm work per step and a weight-sized buffer per projection, thrown away; PyTorch
//! skips it for `requires_grad=False`. Here the product is computed by candle's matmul outside
//! the graph and attached to `x` by a custom op whose backward yields `dy W` only.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Attaches a precomputed `y = x Wᵀ` to `x`; backward: `dx = dy W`, nothing for `y`.
struct FrozenRhs {
    /// `[out, in]`.
    w: Tensor,
}

impl CustomOp2 for FrozenRhs {
    fn name(&self) -> &'static str {
        "vlalign-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s2 else {
            bail!("frozen matmul: float32 only");
        };
        let Some((a, b)) = l2.contiguous_offsets() else {
            bail!("frozen matmul: the product must be contiguous");
        };
        Ok((CpuStorage::F32(v[a..b].to_vec()), l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if l2.contiguous_offsets() != Some((0, l2.shape().elem_count())) {
            bail!("frozen matmul: the product must be contiguous from offset 0");
        }
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.matmul(&self.w)?), None))
    }
}

/// `x Wᵀ` for `x` `[rows, in]` and `w` `[out, in]`; when `x` carries a gradient and `w` does not,
/// the backward pass forms `x`'s gradient only. Bit-identical to `x.matmul(&w.t())` either way.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !(x.track_op() && !w.track_op() && super::fused::supported(x)) {
        return x.matmul(&w.t()?);
    }
    let y = x.detach().matmul(&w.t()?)?;
    x.apply_op2(&y, FrozenRhs { w: w.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Against candle's own matmul: the same product and the same input gradient, bit for bit,
    /// and no gradient for the frozen weight (candle's forms one and discards it).
    #[test]
    fn input_gradient_is_candles_and_the_weight_gets_none() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (7, 12), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 12), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        let ours = matmul_t(x.as_tensor(), &w).unwrap();
        let theirs = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert_eq!(bits(&ours), bits(&theirs));
        let backward = |y: &Tensor| {
            y.mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g_ours, g_theirs) = (backward(&ours), backward(&theirs));
        assert_eq!(
            bits(g_ours.get(x.as_tensor()).unwrap()),
            bits(g_theirs.get(x.as_tensor()).unwrap())
        );
        // candle files the weight's gradient under its transpose's id: count weight-sized ones.
        let weight_sized = |g: &candle_core::backprop::GradStore| {
            g.get_ids()
                .filter(|&&id| g.get_id(id).is_some_and(|t| t.elem_count() == 60))
                .count()
        };
        assert_eq!(weight_sized(&g_ours), 0);
        assert_eq!(weight_sized(&g_theirs), 1);
        // A weight on a gradient path keeps candle's matmul (and its gradient).
        let wv = Var::randn(0f32, 1.0, (5, 12), &dev).unwrap();
        let g = matmul_t(x.as_tensor(), wv.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(g.get(wv.as_tensor()).unwrap().dtype(), DType::F32);
    }
}
