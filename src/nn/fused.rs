//! Fused CPU kernels with their own backward passes for the ops that dominate a small
//! transformer's train step when composed from candle primitives (DESIGN.md §2: candle's fast
//! ops have no backward; their compositions allocate a tensor per primitive and reduce over
//! leading dimensions on a slow strided path). Each forward is one pass over rows; each backward
//! is another fused kernel. float32, contiguous inputs, on the CPU and (cargo feature `cuda`)
//! on CUDA, whose kernels are in fused.cu (fused_cuda.rs launches them); callers fall back to
//! compositions elsewhere (see [`supported`]).

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

use super::vecmath;

/// Rows per parallel task: enough work to amortise scheduling.
const ROW_CHUNK: usize = 64;

/// Whether the fused kernels apply to `x`: float32 on the CPU; on CUDA (a `cuda` build) only
/// with `VLALIGN_FUSED_CUDA=1`, until tools/device-check.sh has verified the CUDA kernels on a
/// GPU (they are written and compile, but no GPU was available since; candle's compositions
/// run there meanwhile).
pub fn supported(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && (x.device().is_cpu() || (x.device().is_cuda() && cuda_enabled()))
}

/// Whether the elementwise kernels — [`activation`] and [`add_bias`] (with its column-sum
/// gradient) — apply to `x`: as [`supported`], and to bfloat16 on CUDA too (mixed precision's
/// MLP activation and the biases of its bfloat16 products; fused.cu computes in float32 and
/// rounds once, and sums the bias gradient in float32 where candle's reduction adds in
/// bfloat16).
pub fn supported_elementwise(x: &Tensor) -> bool {
    supported(x) || (x.dtype() == DType::BF16 && x.device().is_cuda() && cuda_enabled())
}

/// Whether fused.cu's kernels run on CUDA devices (`VLALIGN_FUSED_CUDA=1`; train/adamw_fused.rs
/// asks too).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("VLALIGN_FUSED_CUDA").is_ok_and(|v| v == "1"))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_enabled() -> bool {
    false
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: float32 only");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// The CPU float32 slices of contiguous tensors, for a backward pass (`what` names them in an
/// error).
pub(super) fn with_f32s<T, const N: usize>(
    ts: [&Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> Result<T>,
) -> Result<T> {
    let guards = ts.map(|t| t.storage_and_layout());
    let mut slices = [&[][..]; N];
    for (slice, (s, l)) in slices.iter_mut().zip(&guards) {
        let Storage::Cpu(s) = &**s else {
            bail!("{what} is not on the CPU");
        };
        *slice = f32s(s, l, what)?;
    }
    f(slices)
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNormOp {
    eps: f32,
    /// The output's type: float32, or bfloat16 (CUDA only: mixed precision's LayerNorm before
    /// bfloat16 products, normalised in float32 and rounded once).
    out: DType,
}

/// Mean and 1/std of a row (biased variance, as torch.nn.LayerNorm), summed in lanes.
#[inline(always)]
fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let n = r.len() as f32;
    let mean = vecmath::sum_of(r.len(), |i| r[i]) / n;
    let var = vecmath::sum_of(r.len(), |i| (r[i] - mean) * (r[i] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

vecmath::multiversion! {
    /// LayerNorm of the rows (of `n`) of a chunk.
    fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], n: usize, eps: f32) {
        let (w, b) = (&w[..n], &b[..n]);
        for (yr, xr) in y.chunks_mut(n).zip(x.chunks(n)) {
            let (yr, xr) = (&mut yr[..n], &xr[..n]);
            let (mean, rstd) = row_stats(xr, eps);
            for i in 0..n {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }
}

vecmath::multiversion! {
    /// LayerNorm's backward over the rows (of `n`) of a chunk: dx, and this chunk's dw and db
    /// added into `dw`, `db` (`xhat`: scratch of `n`).
    fn layer_norm_bwd_rows(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        sums: (&mut [f32], &mut [f32], &mut [f32]),
        n: usize,
        eps: f32,
    ) {
        let (dw, db, xhat) = sums;
        let (w, dw, db, xhat) = (&w[..n], &mut dw[..n], &mut db[..n], &mut xhat[..n]);
        for ((dxr, xr), dyr) in dx.chunks_mut(n).zip(x.chunks(n)).zip(dy.chunks(n)) {
            let (dxr, xr, dyr) = (&mut dxr[..n], &xr[..n], &dyr[..n]);
            let (mean, rstd) = row_stats(xr, eps);
            for i in 0..n {
                xhat[i] = (xr[i] - mean) * rstd;
                dw[i] += dyr[i] * xhat[i];
                db[i] += dyr[i];
            }
            let mg = vecmath::sum_of(n, |i| dyr[i] * w[i]) / n as f32;
            let mgx = vecmath::sum_of(n, |i| dyr[i] * w[i] * xhat[i]) / n as f32;
            for i in 0..n {
                dxr[i] = rstd * (dyr[i] * w[i] - mg - xhat[i] * mgx);
            }
        }
    }
}

/// LayerNorm of every row (of `n`) of `x`, rows split over rayon's pool.
pub(super) fn layer_norm_forward(x: &[f32], w: &[f32], b: &[f32], n: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(n * ROW_CHUNK)
        .zip(x.par_chunks(n * ROW_CHUNK))
        .for_each(|(yc, xc)| layer_norm_rows(xc, w, b, yc, n, eps));
    y
}

/// [`layer_norm_backward`] into a new dx (rows of `w.len()`), returned.
pub(super) fn layer_norm_dx(
    (x, w, dy): (&[f32], &[f32], &[f32]),
    eps: f32,
    (dw, db): (&mut [f32], &mut [f32]),
) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    layer_norm_backward((x, w, dy), w.len(), eps, (&mut dx, dw, db));
    dx
}

/// LayerNorm's backward over every row: writes `dx` (as long as `x`) and adds Σ dy·x̂ and Σ dy
/// into `dw` and `db` (`n` each). Partial sums per fixed chunk of rows, added in chunk order,
/// so the result does not depend on the threads.
pub(super) fn layer_norm_backward(
    (x, w, dy): (&[f32], &[f32], &[f32]),
    n: usize,
    eps: f32,
    (dx, dw, db): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(n * ROW_CHUNK)
        .zip(x.par_chunks(n * ROW_CHUNK))
        .zip(dy.par_chunks(n * ROW_CHUNK))
        .map(|((dxc, xc), dyc)| {
            let (mut dw, mut db) = (vec![0f32; n], vec![0f32; n]);
            let mut xhat = vec![0f32; n];
            let sums = (&mut dw[..], &mut db[..], &mut xhat[..]);
            layer_norm_bwd_rows(xc, w, dyc, dxc, sums, n, eps);
            (dw, db)
        })
        .collect();
    for (pw, pb) in partials {
        for i in 0..n {
            dw[i] += pw[i];
            db[i] += pb[i];
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "vlalign-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.out != DType::F32 {
            bail!("layer_norm: a {:?} output is CUDA only", self.out);
        }
        let (x, w, b) = (
            f32s(s1, l1, "layer_norm")?,
            f32s(s2, l2, "layer_norm")?,
            f32s(s3, l3, "layer_norm")?,
        );
        let n = last_dim(l1);
        if w.len() != n || b.len() != n {
            bail!(
                "layer_norm: weight {} / bias {} for rows of {n}",
                w.len(),
                b.len()
            );
        }
        Ok((
            CpuStorage::F32(layer_norm_forward(x, w, b, n, self.eps)),
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = last_dim(l1);
        if l2.shape().elem_count() != n || l3.shape().elem_count() != n {
            bail!("layer_norm: weight/bias for rows of {n}");
        }
        let y = super::fused_cuda::layer_norm((s1, l1), (s2, l2), (s3, l3), n, self.eps, self.out)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.dim(0)?;
        let m = x.elem_count() / n;
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, m * n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, m * n, n)?;
        let db = packed.narrow(0, m * n + n, n)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of LayerNorm: with x̂ the normalised row and g = dy·w,
/// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), dw = Σ dy·x̂, db = Σ dy, packed as [dx, dw, db].
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "vlalign-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (
            f32s(s1, l1, "layer_norm_bwd")?,
            f32s(s2, l2, "layer_norm_bwd")?,
            f32s(s3, l3, "layer_norm_bwd")?,
        );
        let n = w.len();
        let mut out = vec![0f32; x.len() + 2 * n];
        let (dx, tail) = out.split_at_mut(x.len());
        let (dw, db) = tail.split_at_mut(n);
        layer_norm_backward((x, w, dy), n, self.eps, (dx, dw, db));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l2.shape().elem_count();
        let len = l1.shape().elem_count() + 2 * n;
        let out = super::fused_cuda::layer_norm_bwd((s1, l1), (s2, l2), (s3, l3), n, self.eps)?;
        Ok((out, Shape::from(len)))
    }
}

/// LayerNorm over the last dimension, differentiable in all three inputs.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_as(x, w, b, eps, DType::F32)
}

/// Whether [`layer_norm_bf16`] runs for `x`: float32 on CUDA with the fused kernels on.
pub fn layer_norm_bf16_supported(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cuda() && cuda_enabled()
}

/// LayerNorm of float32 `x` (weights float32) with a bfloat16 output, in one kernel each way:
/// what the LayerNorm + cast before mixed precision's bfloat16 products computes, without the
/// float32 output and the cast (CUDA; see [`layer_norm_bf16_supported`]). The gradients reach
/// `x`, `w` and `b` in float32.
pub fn layer_norm_bf16(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_as(x, w, b, eps, DType::BF16)
}

fn layer_norm_as(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, out: DType) -> Result<Tensor> {
    let op = LayerNormOp {
        eps: eps as f32,
        out,
    };
    x.contiguous()?.apply_op3(w, b, op)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "vlalign-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l);
        let mut y = f32s(s, l, "softmax")?.to_vec();
        if n > 0 {
            y.par_chunks_mut(n * ROW_CHUNK)
                .for_each(|c| softmax_rows(c, n));
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::fused_cuda::softmax((s, l), last_dim(l))?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwd)?))
    }
}

/// dx = y ⊙ (dy − Σ dy ⊙ y), row-wise.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "vlalign-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (f32s(s1, l1, "softmax_bwd")?, f32s(s2, l2, "softmax_bwd")?);
        let n = last_dim(l1);
        let mut dx = dy.to_vec();
        dx.par_chunks_mut(n * ROW_CHUNK)
            .zip(y.par_chunks(n * ROW_CHUNK))
            .for_each(|(dc, yc)| softmax_bwd_rows(yc, dc, n, 1.0));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = super::fused_cuda::softmax_bwd((s1, l1), (s2, l2), last_dim(l1))?;
        Ok((dx, l1.shape().clone()))
    }
}

vecmath::multiversion! {
    /// Each row of `x` (rows of `n` > 0) replaced by its softmax: the exps of the row minus its
    /// maximum, over their sum (`vecmath::sum_of`'s lanes: a sum in order was a chain of
    /// dependent adds, the slowest part of a short attention row).
    pub(super) fn softmax_rows(x: &mut [f32], n: usize) {
        for r in x.chunks_mut(n) {
            let max = vecmath::max_of(r.len(), |i| r[i]);
            for v in r.iter_mut() {
                *v = vecmath::exp(*v - max);
            }
            let sum = vecmath::sum_of(r.len(), |i| r[i]);
            let inv = 1.0 / sum;
            for v in r.iter_mut() {
                *v *= inv;
            }
        }
    }
}

vecmath::multiversion! {
    /// Softmax's backward over the rows (of `n`) of a chunk, in place: `g ← y ⊙ (g − Σ g ⊙ y) ·
    /// scale` (`scale` folds in a factor applied before the softmax: attention's d^-½).
    pub(super) fn softmax_bwd_rows(y: &[f32], g: &mut [f32], n: usize, scale: f32) {
        for (yr, gr) in y.chunks(n).zip(g.chunks_mut(n)) {
            let (yr, gr) = (&yr[..n], &mut gr[..n]);
            let dot = vecmath::sum_of(n, |i| yr[i] * gr[i]);
            for i in 0..n {
                gr[i] = yr[i] * (gr[i] - dot) * scale;
            }
        }
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp)
}

// ---------------------------------------------------------------------------------------------
// Activations

/// Elementwise activations with closed-form derivatives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// x·σ(1.702x).
    QuickGelu,
    /// 0.5·x·(1 + erf(x/√2)).
    GeluErf,
}

impl Act {
    /// fused.cu's `act` argument.
    #[cfg(feature = "cuda")]
    fn code(self) -> i32 {
        match self {
            Act::QuickGelu => 0,
            Act::GeluErf => 1,
        }
    }

    /// exp and erf are vecmath's, so that the loops below vectorise.
    #[inline(always)]
    fn f(self, x: f32) -> f32 {
        match self {
            Act::QuickGelu => x / (1.0 + vecmath::exp(-1.702 * x)),
            Act::GeluErf => 0.5 * x * (1.0 + vecmath::erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        }
    }

    #[inline(always)]
    fn df(self, x: f32) -> f32 {
        match self {
            Act::QuickGelu => {
                let s = 1.0 / (1.0 + vecmath::exp(-1.702 * x));
                s + 1.702 * x * s * (1.0 - s)
            }
            Act::GeluErf => {
                let cdf = 0.5 * (1.0 + vecmath::erf(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = vecmath::exp(-0.5 * x * x) * 0.398_942_3;
                cdf + x * pdf
            }
        }
    }
}

vecmath::multiversion! {
    /// `y = f(x)` over a chunk, one loop per activation (vectorised; AVX2 when the CPU has it).
    fn act_forward(act: Act, x: &[f32], y: &mut [f32]) {
        let y = &mut y[..x.len()];
        match act {
            Act::QuickGelu => {
                for i in 0..x.len() {
                    y[i] = Act::QuickGelu.f(x[i]);
                }
            }
            Act::GeluErf => {
                for i in 0..x.len() {
                    y[i] = Act::GeluErf.f(x[i]);
                }
            }
        }
    }
}

vecmath::multiversion! {
    /// `dx = dy · f'(x)` over a chunk.
    fn act_backward(act: Act, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let (dy, dx) = (&dy[..x.len()], &mut dx[..x.len()]);
        match act {
            Act::QuickGelu => {
                for i in 0..x.len() {
                    dx[i] = dy[i] * Act::QuickGelu.df(x[i]);
                }
            }
            Act::GeluErf => {
                for i in 0..x.len() {
                    dx[i] = dy[i] * Act::GeluErf.df(x[i]);
                }
            }
        }
    }
}

const ELEM_CHUNK: usize = 16 * 1024;

/// `act(x)` element-wise, chunks split over rayon's pool.
pub(super) fn activation_forward(act: Act, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK))
        .for_each(|(yc, xc)| act_forward(act, xc, yc));
    y
}

/// `dy · act'(x)` element-wise.
pub(super) fn activation_backward(act: Act, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK))
        .zip(dy.par_chunks(ELEM_CHUNK))
        .for_each(|((dc, xc), gc)| act_backward(act, xc, gc, dc));
    dx
}

struct ActOp(Act);

impl CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "vlalign-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "activation")?;
        Ok((
            CpuStorage::F32(activation_forward(self.0, x)),
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::fused_cuda::activation((s, l), self.0.code())?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&dy.contiguous()?, &ActBwd(self.0))?,
        ))
    }
}

struct ActBwd(Act);

impl CustomOp2 for ActBwd {
    fn name(&self) -> &'static str {
        "vlalign-activation-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (
            f32s(s1, l1, "activation_bwd")?,
            f32s(s2, l2, "activation_bwd")?,
        );
        Ok((
            CpuStorage::F32(activation_backward(self.0, x, dy)),
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = super::fused_cuda::activation_bwd((s1, l1), (s2, l2), self.0.code())?;
        Ok((dx, l1.shape().clone()))
    }
}

pub fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActOp(act))
}

// ---------------------------------------------------------------------------------------------
// Row-broadcast bias add

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "vlalign-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (f32s(s1, l1, "add_bias")?, f32s(s2, l2, "add_bias")?);
        let n = b.len();
        if last_dim(l1) != n {
            bail!("add_bias: bias of {n} for rows of {}", last_dim(l1));
        }
        Ok((CpuStorage::F32(rows_plus(x, b)), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l2.shape().elem_count();
        if last_dim(l1) != n {
            bail!("add_bias: bias of {n} for rows of {}", last_dim(l1));
        }
        let y = super::fused_cuda::add_bias((s1, l1), (s2, l2), n)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = dy
            .contiguous()?
            .apply_op1_no_bwd(&ColumnSum { n: b.dim(0)? })?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

/// Σ over the rows of `x` (rows of `n`). Partial sums per fixed chunk, added in chunk order:
/// rayon's `reduce` would associate them by work-stealing and make the sum (and every run after
/// it) vary in the last bits.
pub(super) fn column_sum(x: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = x
        .par_chunks(n * ROW_CHUNK)
        .map(|c| {
            let mut acc = vec![0f32; n];
            for r in c.chunks(n) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    vecmath::add_in_order(partials, n)
}

/// Σ over rows of a `[.., n]` tensor → `[n]`.
struct ColumnSum {
    n: usize,
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "vlalign-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "column_sum")?;
        Ok((CpuStorage::F32(column_sum(x, self.n)), Shape::from(self.n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let total = super::fused_cuda::column_sum((s, l), self.n)?;
        Ok((total, Shape::from(self.n)))
    }
}

/// `b` added to every row of `y` (rows of `b.len()`), in place.
pub(super) fn add_rows(y: &mut [f32], b: &[f32]) {
    let n = b.len().max(1);
    y.par_chunks_mut(n * ROW_CHUNK).for_each(|c| {
        for r in c.chunks_mut(n) {
            r.iter_mut().zip(b).for_each(|(o, bv)| *o += bv);
        }
    });
}

/// `x` with `b` added to every row (rows of `b.len()`).
pub(super) fn rows_plus(x: &[f32], b: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    add_rows(&mut y, b);
    y
}

/// `x + b` with `b` broadcast over all leading dimensions; the bias gradient is one fused
/// column sum instead of candle's strided leading-dimension reduction.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(b, AddBias)
}

// ---------------------------------------------------------------------------------------------
// Attention probabilities in mixed precision (CUDA only)

/// softmax(scale·scores + mask) from bfloat16 scores `[B, H, Tq, Tk]` to bfloat16 probabilities,
/// the mask `[B, Tq, Tk]` float32 (or none); the backward recomputes the probabilities in float32.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // read by the CUDA launch only
struct AttnSoftmax {
    scale: f32,
    heads: usize,
    q_len: usize,
    masked: bool,
}

#[cfg(feature = "cuda")]
impl AttnSoftmax {
    /// The forward over scores `x` (with the mask when there is one), or with `dy` the backward.
    fn run(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        mask: (&candle_core::CudaStorage, &Layout),
        dy: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::fused_cuda::attn_softmax_bf16(
            x,
            self.masked.then_some(mask),
            dy,
            last_dim(x.1),
            self.scale,
            self.heads * self.q_len,
            self.q_len,
        )?;
        Ok((out, x.1.shape().clone()))
    }
}

/// The CPU side of an op whose kernel exists for CUDA only (`what` names it).
pub(crate) fn cuda_only(what: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{what} runs on CUDA only")
}

impl CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "vlalign-attn-softmax-bf16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only("the bfloat16 attention softmax kernel")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        mask: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(mask, &dy.contiguous()?, &AttnSoftmaxBwd(*self))?;
        Ok((Some(dx), None))
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // read by the CUDA launch only
struct AttnSoftmaxBwd(AttnSoftmax);

impl CustomOp3 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "vlalign-attn-softmax-bf16-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only("the bfloat16 attention softmax kernel")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// Attention probabilities `softmax(scale·scores + mask)` for bfloat16 `scores` `[B, H, Tq, Tk]`
/// on CUDA, as bfloat16, by one fused kernel forward and one backward (fused.cu), where the
/// composition casts to float32, scales, adds the mask, normalises and casts back (keeping the
/// float32 probabilities for its backward). `None` where it does not apply: not bfloat16 on
/// CUDA with `VLALIGN_FUSED_CUDA=1`, or a mask that does not broadcast to `[B, 1, Tq, Tk]`.
pub fn attn_softmax_bf16(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    if scores.dtype() != DType::BF16 || !supported_elementwise(scores) {
        return Ok(None);
    }
    attn_softmax_op(scores, mask, scale)
}

/// [`attn_softmax_bf16`] without asking whether the kernels are switched on (what
/// [`check_against_compositions`] runs).
fn attn_softmax_op(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Option<Tensor>> {
    let (b, heads, q_len, k_len) = scores.dims4()?;
    let mask = match mask {
        Some(m) => match m.broadcast_as((b, 1, q_len, k_len)) {
            Ok(m) => Some(m.to_dtype(DType::F32)?.contiguous()?),
            Err(_) => return Ok(None),
        },
        None => None,
    };
    let op = AttnSoftmax {
        scale: scale as f32,
        heads,
        q_len,
        masked: mask.is_some(),
    };
    let scores = scores.contiguous()?;
    // Without a mask the op still takes a second tensor: the scores stand in, never read (no
    // placeholder allocated per attention call).
    let mask = mask.unwrap_or_else(|| scores.clone());
    scores.apply_op2(&mask, op).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Mixed precision's residual add

/// `x + h` with `h` widened to `x`'s type: the residual add after a block that computed in
/// another float type (mixed precision). Float32 `x` and bfloat16 `h` on CUDA with the fused
/// kernels: one kernel ([`AddWidened`]), no float32 copy of `h` made (or kept for backward);
/// otherwise `x + h.to_dtype(x.dtype())` (in float32 throughout, `x + h`).
pub fn residual_add(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let fused = x.dtype() == DType::F32
        && h.dtype() == DType::BF16
        && x.dims() == h.dims()
        && x.device().is_cuda()
        && cuda_enabled();
    match fused {
        true => residual_add_op(x, h),
        false => x + h.to_dtype(x.dtype())?,
    }
}

/// [`residual_add`]'s kernel, whether or not the fused kernels are switched on (what
/// [`check_against_compositions`] runs).
fn residual_add_op(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&h.contiguous()?, AddWidened)
}

/// `y = x + widen(h)`, float32 `x` and `y`, bfloat16 `h` (fused.cu `vl_add_widened_bf16`);
/// backward dx = dy, dh = dy rounded to bfloat16.
struct AddWidened;

impl CustomOp2 for AddWidened {
    fn name(&self) -> &'static str {
        "vlalign-residual-add-bf16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only("the bfloat16 residual add kernel")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        h: &candle_core::CudaStorage,
        hl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::fused_cuda::add_widened((x, xl), (h, hl))?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(dy.to_dtype(h.dtype())?)))
    }
}

/// max |a − c| / max |c| (the denominator floored at 1e-6): how far a fused op's result `a` is
/// from the composition's `c`.
pub fn rel(a: &Tensor, c: &Tensor) -> Result<f32> {
    let max = |t: Tensor| super::host::f32_of(&t.abs()?.flatten_all()?.max(0)?);
    Ok(max((a - c)?)? / max(c.clone())?.max(1e-6))
}

/// Each fused op against the same function composed from candle primitives on `device`, on
/// random inputs of `shape` (the last dimension is the rows' length): `(op, max |Δ value| /
/// max |value|, max |Δ gradient| / max |gradient|)`, the gradients being those of a random
/// linear functional of the output with respect to the input and the op's weights. The unit
/// tests hold the CPU kernels to it; `vlalign bench --suite kernels` reports it for a GPU, where
/// the rows named `… bf16` check the bfloat16 kernels too.
pub fn check_against_compositions(
    device: &candle_core::Device,
    shape: (usize, usize, usize),
) -> Result<Vec<(String, f32, f32)>> {
    use candle_core::{Var, D};
    let n = shape.2;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.5, shape, device)?)?;
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, n, device)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, n, device)?)?;
    let probe = Tensor::randn(0f32, 1.0, shape, device)?;
    let composed_ln = |x: &Tensor| {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)
    };
    type Case<'a> = (
        &'static str,
        Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>,
        Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>,
    );
    let cases: Vec<Case> = vec![
        (
            "layer_norm",
            Box::new(|x| layer_norm(x, &w, &b, 1e-5)),
            Box::new(composed_ln),
        ),
        (
            "softmax",
            Box::new(softmax_last),
            Box::new(|x| candle_nn::ops::softmax(x, D::Minus1)),
        ),
        (
            "quick_gelu",
            Box::new(|x| activation(x, Act::QuickGelu)),
            Box::new(|x| x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)),
        ),
        (
            "gelu_erf",
            Box::new(|x| activation(x, Act::GeluErf)),
            Box::new(|x| x.gelu_erf()),
        ),
        (
            "add_bias",
            Box::new(|x| add_bias(x, &b)),
            Box::new(|x| x.broadcast_add(&b)),
        ),
    ];
    // Mixed precision on CUDA: the bfloat16 kernels from bf16-rounded inputs (LayerNorm: from
    // float32 ones, into a bfloat16 output), against the float32 compositions from the same
    // inputs widened back (relative differences of bfloat16's order, 2^-8, where the float32 rows
    // show float32's).
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16);
    // Attention scores [B, 1, T, n] with an additive mask of the same shape.
    let mask = Tensor::randn(0f32, 1.0, (shape.0, 1, shape.1, n), device)?;
    let widened = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let narrow_cases: Vec<Case> = vec![
        (
            "layer_norm bf16",
            Box::new(|x| layer_norm_bf16(x, &w, &b, 1e-5)?.to_dtype(DType::F32)),
            Box::new(composed_ln),
        ),
        (
            "quick_gelu bf16",
            Box::new(|x| activation(&bf16(x)?, Act::QuickGelu)?.to_dtype(DType::F32)),
            Box::new(|x| {
                let x = widened(x)?;
                x.mul(&candle_nn::ops::sigmoid(&(&x * 1.702)?)?)
            }),
        ),
        (
            "gelu_erf bf16",
            Box::new(|x| activation(&bf16(x)?, Act::GeluErf)?.to_dtype(DType::F32)),
            Box::new(|x| widened(x)?.gelu_erf()),
        ),
        (
            "add_bias bf16",
            Box::new(|x| add_bias(&bf16(x)?, &bf16(&b)?)?.to_dtype(DType::F32)),
            Box::new(|x| widened(x)?.broadcast_add(&widened(&b)?)),
        ),
        (
            "residual_add bf16",
            Box::new(|x| residual_add_op(x, &bf16(&probe)?)),
            Box::new(|x| x + widened(&probe)?),
        ),
        (
            "attn_softmax bf16",
            Box::new(|x| {
                let p = attn_softmax_op(&bf16(&x.unsqueeze(1)?)?, Some(&mask), 0.125)?;
                let p = p.ok_or_else(|| candle_core::Error::Msg("mask not applied".into()))?;
                p.to_dtype(DType::F32)?.squeeze(1)
            }),
            Box::new(|x| {
                let scores = (widened(&x.unsqueeze(1)?)? * 0.125)?.broadcast_add(&mask)?;
                candle_nn::ops::softmax(&scores, D::Minus1)?.squeeze(1)
            }),
        ),
    ];
    let cases = if device.is_cuda() {
        cases.into_iter().chain(narrow_cases).collect()
    } else {
        cases
    };
    let mut out = Vec::new();
    for (name, fused, composed) in cases {
        let yf = fused(x.as_tensor())?;
        let yc = composed(x.as_tensor())?;
        let value = rel(&yf, &yc)?;
        let gf = (yf * &probe)?.sum_all()?.backward()?;
        let gc = (yc * &probe)?.sum_all()?.backward()?;
        let mut grad = 0f32;
        for v in [&x, &w, &b] {
            match (gf.get(v), gc.get(v)) {
                (Some(a), Some(c)) => grad = grad.max(rel(a, c)?),
                (None, None) => {}
                _ => bail!("{name}: a gradient present in one path only"),
            }
        }
        out.push((name.to_string(), value, grad));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The bias gradient's column sum adds its partials in a fixed order: the same bits every
    /// run, however rayon schedules the chunks.
    #[test]
    fn bias_gradient_is_bit_identical_run_to_run() {
        // Large enough that rayon splits the column sum across threads.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4096, 48), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4096, 48), &dev).unwrap();
        let b = Var::zeros(48, DType::F32, &dev).unwrap();
        let grad = || -> Vec<u32> {
            let loss = add_bias(&x, &b)
                .unwrap()
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let v: Vec<f32> = g.get(&b).unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        let first = grad();
        for _ in 0..20 {
            assert_eq!(grad(), first);
        }
    }

    #[test]
    fn fused_ops_match_compositions() {
        for (op, value, grad) in check_against_compositions(&Device::Cpu, (3, 70, 24)).unwrap() {
            assert!(
                value <= 1e-5 && grad <= 1e-4,
                "{op}: values {value:e}, gradients {grad:e}"
            );
        }
    }
}
