//! The gradient norm's sum of squares on CUDA in two launches per gradient (nn/fused.cu's
//! `vl_sumsq_partial` and `vl_sumsq_total`), where optim.rs's composition makes four (square,
//! sum, cast to float64, add) with an allocation each: ~1,600 launches a step for the ~400
//! gradients of a ViT-B/32 CLIP, of the ~2,400 its clipping made. The squares are summed in
//! float64 in a fixed association for a given length, so the norm is the same on every run; it
//! is not the composition's float32 sum, so it is used on CUDA only (the CPU keeps the
//! composition and its results), and, like the other fused.cu kernels, only with
//! `VLALIGN_FUSED_CUDA=1` until a GPU has verified it. tools/check-fused-cu.sh checks the
//! kernels against a long-double sum.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Whether [`onto`] runs for gradient `g`: float32 on CUDA with fused.cu's kernels switched on.
pub(super) fn supported(g: &Tensor) -> bool {
    g.dtype() == DType::F32 && g.device().is_cuda() && crate::nn::fused::cuda_enabled()
}

/// `total + Σ g²` as a float64 scalar, `total` a float64 scalar on `g`'s device.
pub(super) fn onto(g: &Tensor, total: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2_no_bwd(total, &SumSq)
}

struct SumSq;

impl CustomOp2 for SumSq {
    fn name(&self) -> &'static str {
        "vlalign-sumsq"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::nn::fused::cuda_only("the float64 sum of squares kernel")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        total: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::nn::fused_cuda::sumsq((g, gl), (total, tl))?;
        Ok((out, Shape::from(())))
    }
}
