//! AdamW's update of one float32 variable as three in-place passes (first moment, second moment,
//! the step), where the op-by-op composition in optim.rs makes ~13 tensors per variable and
//! reads and writes each: ~4% of a clip-tiny train step on the CPU; on CUDA ~15 kernel launches
//! and ~13 allocations per variable against three launches and none (a ViT-B/32 CLIP has ~400
//! variables, and its float32 AdamW took 49 ms of an 893 ms step on an H200 composed). The
//! arithmetic is the composition's, operation for operation in the same order and rounding
//! (candle's `t * s` is `t · (s as f32) + 0`, `t / s` is `t · (1/s as f32) + 0`, `t + s` is
//! `t · 1 + (s as f32)`), so on the CPU both give the same bits:
//! `the_fused_update_gives_the_composition_bits` holds them together. The CUDA passes
//! (`vl_adamw_moment`, `vl_adamw_step` in nn/fused.cu) round each operation on its own as well,
//! so they give the CPU kernels' bits (tools/check-fused-cu.sh; on a GPU, the `adamw = cpu` row
//! of `vlalign bench --suite kernels`); they run with `VLALIGN_FUSED_CUDA=1`, as the other
//! fused.cu kernels, until a GPU has verified them.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task (a fixed split: the passes are element-wise, so it does not change
/// a result).
const CHUNK: usize = 32 * 1024;

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("adamw: {what} is not float32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => bail!("adamw: {what} is not contiguous"),
    }
}

/// A float32 contiguous operand of `len` elements.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str, len: usize) -> Result<&'a [f32]> {
    let v = crate::nn::fused::f32s(s, l, &format!("adamw: {what}"))?;
    if v.len() != len {
        bail!("adamw: {what} has {} elements for {len}", v.len());
    }
    Ok(v)
}

/// `m ← m·β + g·(1 − β)` (`square`: `g²` for `g`): the first or the second moment.
struct Moment {
    beta: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "vlalign-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let m = slice_mut(dst, dst_l, "moment")?;
        let g = slice(g, gl, "gradient", m.len())?;
        let (b, c) = (self.beta as f32, (1.0 - self.beta) as f32);
        let square = self.square;
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = if square { g * g } else { g };
                    *m = (*m * b + 0.0) + (g * c + 0.0);
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let betas = (self.beta as f32, (1.0 - self.beta) as f32);
        crate::nn::fused_cuda::adamw_moment((dst, dst_l), (g, gl), betas, self.square)
    }
}

/// `θ ← θ·(1 − lr·λ) − (m / (√v · (1/√(1 − β₂ᵗ)) + ε)) · (lr / (1 − β₁ᵗ))`, the decay factor
/// only for a decayed variable.
pub(super) struct Step {
    pub decay: Option<f64>,
    pub inv_bc2_sqrt: f64,
    pub eps: f64,
    pub lr_over_bc1: f64,
}

impl InplaceOp3 for Step {
    fn name(&self) -> &'static str {
        "vlalign-adamw-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let theta = slice_mut(dst, dst_l, "variable")?;
        let m = slice(m, ml, "first moment", theta.len())?;
        let v = slice(v, vl, "second moment", theta.len())?;
        let decay = self.decay.map(|d| d as f32);
        let (inv, eps, rate) = (
            self.inv_bc2_sqrt as f32,
            self.eps as f32,
            self.lr_over_bc1 as f32,
        );
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(t, (m, v))| {
                for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                    let decayed = match decay {
                        Some(d) => *t * d + 0.0,
                        None => *t,
                    };
                    let denom = (v.sqrt() * inv + 0.0) * 1.0 + eps;
                    *t = decayed - ((m / denom) * rate + 0.0);
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        let step = crate::nn::fused_cuda::AdamwStep {
            decay: self.decay.map(|d| d as f32),
            inv_bc2_sqrt: self.inv_bc2_sqrt as f32,
            eps: self.eps as f32,
            rate: self.lr_over_bc1 as f32,
        };
        crate::nn::fused_cuda::adamw_step((dst, dst_l), (m, ml), (v, vl), &step)
    }
}

/// Whether the fused update runs: every tensor float32 and contiguous, all on the CPU, or all on
/// CUDA with fused.cu's kernels switched on (`VLALIGN_FUSED_CUDA=1`).
pub(super) fn supported(ts: &[&Tensor]) -> bool {
    let f32_contiguous = ts
        .iter()
        .all(|t| t.dtype() == candle_core::DType::F32 && t.is_contiguous());
    let all_on = |on: fn(&candle_core::Device) -> bool| ts.iter().all(|t| on(t.device()));
    f32_contiguous
        && (all_on(candle_core::Device::is_cpu)
            || (all_on(candle_core::Device::is_cuda) && crate::nn::fused::cuda_enabled()))
}

/// One AdamW update of `theta` in place, with its moments `m` and `v` (each a tensor of its own
/// storage, updated in place too) and gradient `g`.
pub(super) fn update(
    theta: &Tensor,
    (m, v): (&Tensor, &Tensor),
    g: &Tensor,
    (beta1, beta2): (f64, f64),
    step: &Step,
) -> Result<()> {
    m.inplace_op2(
        g,
        &Moment {
            beta: beta1,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            beta: beta2,
            square: true,
        },
    )?;
    theta.inplace_op3(m, v, step)
}

#[cfg(test)]
mod tests {
    use super::super::optim::{AdamW, AdamWConfig, Grads};
    use candle_core::{Device, Tensor, Var};

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Three steps of the fused update and of the op-by-op composition (the same optimiser on
    /// a CPU variable viewed through a transpose, which the fused path declines) give the same
    /// bits, for a decayed matrix and an undecayed vector.
    #[test]
    fn the_fused_update_gives_the_composition_bits() {
        let dev = Device::Cpu;
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        };
        let w0 = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        let b0 = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let fused_w = Var::from_tensor(&w0).unwrap();
        let fused_b = Var::from_tensor(&b0).unwrap();
        // The composed run keeps wᵀ: its gradient, given transposed, is not contiguous.
        let comp_w = Var::from_tensor(&w0.t().unwrap().contiguous().unwrap()).unwrap();
        let comp_b = Var::from_tensor(&b0).unwrap();
        let mut fused = AdamW::new(
            vec![("w".into(), fused_w.clone()), ("b".into(), fused_b.clone())],
            cfg,
        )
        .unwrap();
        let mut comp = AdamW::new(
            vec![("w".into(), comp_w.clone()), ("b".into(), comp_b.clone())],
            cfg,
        )
        .unwrap();
        for step in 0..3 {
            let gw = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
            let gb = (Tensor::randn(0f32, 1.0, 7, &dev).unwrap() * 1e-3).unwrap();
            let mut g = Grads::new();
            g.insert("w".into(), gw.clone());
            g.insert("b".into(), gb.clone());
            fused.step(&g, 1e-2).unwrap();
            let mut g = Grads::new();
            g.insert("w".into(), gw.t().unwrap());
            // A strided view of gb: every second element of [gb, gb] interleaved.
            let strided = Tensor::stack(&[&gb, &gb], 1)
                .unwrap()
                .narrow(1, 0, 1)
                .unwrap();
            g.insert("b".into(), strided.squeeze(1).unwrap());
            comp.step(&g, 1e-2).unwrap();
            let back = comp_w.as_tensor().t().unwrap();
            assert_eq!(bits(fused_w.as_tensor()), bits(&back), "w, step {step}");
            assert_eq!(
                bits(fused_b.as_tensor()),
                bits(comp_b.as_tensor()),
                "b, step {step}"
            );
            assert_ne!(bits(fused_w.as_tensor()), bits(&w0), "w moved");
        }
    }
}
