//! The CUDA side of fused.rs (cargo feature `cuda`): fused.cu compiled once per process by
//! NVRTC (so no nvcc is needed at build or run time for our kernels) and launched on the
//! tensor's stream. Each function takes contiguous float32 storage — the activation, the bias
//! and the column sum bfloat16 too (mixed precision) — and returns new storage of the same type,
//! except AdamW's two, which update theirs in place.
//! tools/check-fused-cu.sh runs fused.cu on the CPU with this file's launch geometry.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
use half::bf16;

const SRC: &str = include_str!("fused.cu");
/// Threads per block (fused.cu's BLOCK) and rows per column-sum chunk (ROWS_PER_CHUNK). These,
/// the `*_cfg` grids and the buffer sizes below are mirrored by hand in
/// tools/cuda-emulate/check_fused.cpp, which runs the kernels on the CPU: change both together.
const BLOCK: u32 = 256;
const ROWS_PER_CHUNK: usize = 64;
/// Most blocks of the sum of squares' first pass (`sumsq_cfg`): at most this many partials,
/// which one thread then adds in order.
const SUMSQ_BLOCKS: usize = 1024;

static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// fused.cu as PTX, compiled on first use.
fn ptx() -> Result<&'static str> {
    PTX.get_or_init(|| {
        nvrtc::compile_ptx(SRC)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string())
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling fused.cu with NVRTC: {e}")))
}

/// The kernel `$name` of fused.cu on the device `$dev` (its module loaded once per device).
macro_rules! kernel {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func($name, "vlalign_fused", ptx()?)?
    };
}

/// The contiguous float32 data of `s` under `l`.
fn data<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, f32>> {
    data_of::<f32>(s, l, op)
}

/// The contiguous data of `s` under `l`, of element type `T`.
fn data_of<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// An element type of the elementwise kernels, with the suffix of its fused.cu names.
trait Elem: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType {
    const SUFFIX: &'static str;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "";
}

impl Elem for bf16 {
    const SUFFIX: &'static str = "_bf16";
}

/// The fused.cu name of kernel `base` for element type `T` (`vl_act_fwd` → `vl_act_fwd_bf16`).
fn name_for<T: Elem>(base: &'static str) -> String {
    format!("{base}{}", T::SUFFIX)
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elems_cfg(len: usize) -> LaunchConfig {
    let blocks = len.div_ceil(BLOCK as usize).clamp(1, 1 << 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn sumsq_cfg(len: usize) -> LaunchConfig {
    let blocks = len.div_ceil(BLOCK as usize).clamp(1, SUMSQ_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid over (column blocks, row-chunk slots) for the column-sum kernels, and the number of
/// chunks: a slot takes every `MAX_GRID_Y`-th chunk when there are more (CUDA's grid limit).
fn columns_cfg(rows: usize, n: usize) -> (LaunchConfig, usize) {
    const MAX_GRID_Y: usize = 65_535;
    let chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1);
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(BLOCK as usize) as u32,
            chunks.min(MAX_GRID_Y) as u32,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, chunks)
}

/// Errors when `elements` (a buffer's length) is past what fused.cu's `int` indices reach.
fn check_len(elements: usize, op: &str) -> Result<()> {
    if elements > i32::MAX as usize {
        bail!("{op}: {elements} elements is more than the CUDA kernels index (2^31 - 1)");
    }
    Ok(())
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// `len` zeros: the result of an op on an empty tensor (a launch with an empty grid would fail).
fn zeros(dev: &CudaDevice, len: usize) -> Result<CudaStorage> {
    zeros_of::<f32>(dev, len)
}

fn zeros_of<T: Elem>(dev: &CudaDevice, len: usize) -> Result<CudaStorage> {
    Ok(wrap(dev.alloc_zeros::<T>(len)?, dev))
}

/// Sums `chunks` rows of `width` partials into `out` (chunk order, deterministic).
fn sum_chunks(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
    chunks: usize,
    width: usize,
) -> Result<()> {
    let f = kernel!(dev, "vl_sum_chunks");
    let (c, w) = (chunks as i32, width as i32);
    let mut b = f.builder();
    b.arg(partial).arg(out).arg(&c).arg(&w);
    // SAFETY: the kernel reads chunks·width partials and writes width outputs, both allocated so.
    unsafe { b.launch(elems_cfg(width)) }.w()?;
    Ok(())
}

/// LayerNorm forward over float32 rows of `n`, its output float32 or (`out` bfloat16, mixed
/// precision) rounded once to bfloat16.
pub fn layer_norm(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    n: usize,
    eps: f32,
    out: DType,
) -> Result<CudaStorage> {
    match out {
        DType::F32 => layer_norm_t::<f32>(x, w, b, n, eps),
        DType::BF16 => layer_norm_t::<bf16>(x, w, b, n, eps),
        dt => bail!("layer_norm: no CUDA kernel writes {dt:?} (float32 and bfloat16 do)"),
    }
}

fn layer_norm_t<T: Elem>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    n: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, wv, bv) = (
        data(x.0, x.1, "layer_norm")?,
        data(w.0, w.1, "layer_norm")?,
        data(b.0, b.1, "layer_norm")?,
    );
    let len = xv.len();
    check_len(len, "layer_norm")?;
    let rows = len / n.max(1);
    if rows == 0 {
        return zeros_of::<T>(dev, len);
    }
    // SAFETY: every element is written by the kernel before it is read.
    let y = unsafe { dev.alloc::<T>(len)? };
    let f = kernel!(dev, &name_for::<T>("vl_layer_norm_fwd"));
    let ni = n as i32;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&wv).arg(&bv).arg(&y).arg(&ni).arg(&eps);
    // SAFETY: one block per row of n elements, within the buffers above.
    unsafe { bld.launch(rows_cfg(rows)) }.w()?;
    Ok(wrap(y, dev))
}

/// LayerNorm backward, packed `[dx (rows·n), dw (n), db (n)]` float32 as fused.rs's CPU kernel;
/// `dy` float32 or bfloat16 (the gradient of a bfloat16 output).
pub fn layer_norm_bwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    n: usize,
    eps: f32,
) -> Result<CudaStorage> {
    match dy.0.dtype() {
        DType::F32 => layer_norm_bwd_t::<f32>(x, w, dy, n, eps),
        DType::BF16 => layer_norm_bwd_t::<bf16>(x, w, dy, n, eps),
        dt => bail!("layer_norm_bwd: {dt:?} has no CUDA kernel (float32 and bfloat16 do)"),
    }
}

fn layer_norm_bwd_t<T: Elem>(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    n: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, wv, gv) = (
        data(x.0, x.1, "layer_norm_bwd")?,
        data(w.0, w.1, "layer_norm_bwd")?,
        data_of::<T>(dy.0, dy.1, "layer_norm_bwd")?,
    );
    if gv.len() != xv.len() {
        bail!(
            "layer_norm_bwd: {} gradients for {} inputs",
            gv.len(),
            xv.len()
        );
    }
    let len = xv.len();
    check_len(len + 2 * n, "layer_norm_bwd")?;
    let rows = len / n.max(1);
    if rows == 0 {
        return zeros(dev, len + 2 * n);
    }
    // SAFETY: dx, dw and db (all of out) and every stat are written before being read.
    let mut out = unsafe { dev.alloc::<f32>(len + 2 * n)? };
    let stats = unsafe { dev.alloc::<f32>(2 * rows.max(1))? };
    let ni = n as i32;
    {
        let mut dx = out.slice_mut(0..len);
        let f = kernel!(dev, &name_for::<T>("vl_layer_norm_bwd_dx"));
        let mut bld = f.builder();
        bld.arg(&xv)
            .arg(&wv)
            .arg(&gv)
            .arg(&mut dx)
            .arg(&stats)
            .arg(&ni)
            .arg(&eps);
        // SAFETY: one block per row of n elements, within the buffers above.
        unsafe { bld.launch(rows_cfg(rows)) }.w()?;
    }
    let (cfg, chunks) = columns_cfg(rows, n);
    // SAFETY: the partial kernel writes all chunks·2n entries.
    let partial = unsafe { dev.alloc::<f32>(chunks * 2 * n)? };
    let f = kernel!(dev, &name_for::<T>("vl_layer_norm_bwd_partial"));
    let ri = rows as i32;
    let mut bld = f.builder();
    bld.arg(&xv)
        .arg(&gv)
        .arg(&stats)
        .arg(&partial)
        .arg(&ri)
        .arg(&ni);
    // SAFETY: threads guard j < n and each chunk's rows < rows.
    unsafe { bld.launch(cfg) }.w()?;
    {
        let mut tail = out.slice_mut(len..len + 2 * n);
        sum_chunks(dev, &partial, &mut tail, chunks, 2 * n)?;
    }
    Ok(wrap(out, dev))
}

/// Softmax over rows of `n`.
pub fn softmax(x: (&CudaStorage, &Layout), n: usize) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let xv = data(x.0, x.1, "softmax")?;
    let len = xv.len();
    check_len(len, "softmax")?;
    if len == 0 || n == 0 {
        return zeros(dev, len);
    }
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let f = kernel!(dev, "vl_softmax_fwd");
    let ni = n as i32;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&y).arg(&ni);
    // SAFETY: one block per row of n elements.
    unsafe { bld.launch(rows_cfg(len / n.max(1))) }.w()?;
    Ok(wrap(y, dev))
}

/// Softmax backward: `dx = y ⊙ (dy − Σ dy ⊙ y)` over rows of `n`.
pub fn softmax_bwd(
    y: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    n: usize,
) -> Result<CudaStorage> {
    let dev = &y.0.device;
    let (yv, gv) = (
        data(y.0, y.1, "softmax_bwd")?,
        data(dy.0, dy.1, "softmax_bwd")?,
    );
    let len = yv.len();
    check_len(len, "softmax_bwd")?;
    if len == 0 || n == 0 {
        return zeros(dev, len);
    }
    // SAFETY: every element is written by the kernel.
    let dx = unsafe { dev.alloc::<f32>(len)? };
    let f = kernel!(dev, "vl_softmax_bwd");
    let ni = n as i32;
    let mut bld = f.builder();
    bld.arg(&yv).arg(&gv).arg(&dx).arg(&ni);
    // SAFETY: one block per row of n elements.
    unsafe { bld.launch(rows_cfg(len / n.max(1))) }.w()?;
    Ok(wrap(dx, dev))
}

/// Runs `$f::<T>($args)` for the element type of storage `$s`: float32 or bfloat16.
macro_rules! by_dtype {
    ($s:expr, $op:expr, $f:ident($($args:expr),*)) => {
        match $s.dtype() {
            DType::F32 => $f::<f32>($($args),*),
            DType::BF16 => $f::<bf16>($($args),*),
            dt => bail!("{}: {dt:?} has no CUDA kernel (float32 and bfloat16 do)", $op),
        }
    };
}

/// Elementwise activation `act` (0 quick_gelu, 1 gelu_erf), float32 or bfloat16.
pub fn activation(x: (&CudaStorage, &Layout), act: i32) -> Result<CudaStorage> {
    by_dtype!(x.0, "activation", activation_t(x, act))
}

fn activation_t<T: Elem>(x: (&CudaStorage, &Layout), act: i32) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let xv = data_of::<T>(x.0, x.1, "activation")?;
    let len = xv.len();
    if len == 0 {
        return zeros_of::<T>(dev, 0);
    }
    // SAFETY: every element is written by the grid-stride kernel.
    let y = unsafe { dev.alloc::<T>(len)? };
    let f = kernel!(dev, &name_for::<T>("vl_act_fwd"));
    let l = len as u64;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&y).arg(&l).arg(&act);
    // SAFETY: grid-stride loop bounded by len.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(wrap(y, dev))
}

/// `dx = dy ⊙ act'(x)`, float32 or bfloat16 (`x` and `dy` of one type).
pub fn activation_bwd(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    act: i32,
) -> Result<CudaStorage> {
    by_dtype!(x.0, "activation_bwd", activation_bwd_t(x, dy, act))
}

fn activation_bwd_t<T: Elem>(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    act: i32,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, gv) = (
        data_of::<T>(x.0, x.1, "activation_bwd")?,
        data_of::<T>(dy.0, dy.1, "activation_bwd")?,
    );
    let len = xv.len();
    if len == 0 {
        return zeros_of::<T>(dev, 0);
    }
    if gv.len() != len {
        bail!("activation_bwd: {} gradients for {len} inputs", gv.len());
    }
    // SAFETY: every element is written by the grid-stride kernel.
    let dx = unsafe { dev.alloc::<T>(len)? };
    let f = kernel!(dev, &name_for::<T>("vl_act_bwd"));
    let l = len as u64;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&gv).arg(&dx).arg(&l).arg(&act);
    // SAFETY: grid-stride loop bounded by len.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(wrap(dx, dev))
}

/// `x + b` with `b` (length `n`) broadcast over rows, float32 or bfloat16 (both of one type).
pub fn add_bias(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    n: usize,
) -> Result<CudaStorage> {
    by_dtype!(x.0, "add_bias", add_bias_t(x, b, n))
}

fn add_bias_t<T: Elem>(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    n: usize,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, bv) = (
        data_of::<T>(x.0, x.1, "add_bias")?,
        data_of::<T>(b.0, b.1, "add_bias")?,
    );
    let len = xv.len();
    check_len(n, "add_bias")?;
    if len == 0 || n == 0 {
        return zeros_of::<T>(dev, len);
    }
    if bv.len() != n {
        bail!("add_bias: bias of {} for rows of {n}", bv.len());
    }
    // SAFETY: every element is written by the grid-stride kernel.
    let y = unsafe { dev.alloc::<T>(len)? };
    let f = kernel!(dev, &name_for::<T>("vl_add_bias"));
    let (l, ni) = (len as u64, n as i32);
    let mut bld = f.builder();
    bld.arg(&xv).arg(&bv).arg(&y).arg(&l).arg(&ni);
    // SAFETY: grid-stride loop bounded by len; b is indexed modulo n.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(wrap(y, dev))
}

/// Σ over rows of a `[rows, n]` buffer → `[n]`, in fixed chunks added in order; bfloat16 rows
/// are summed in float32 and the total rounded once.
pub fn column_sum(x: (&CudaStorage, &Layout), n: usize) -> Result<CudaStorage> {
    by_dtype!(x.0, "column_sum", column_sum_t(x, n))
}

fn column_sum_t<T: Elem>(x: (&CudaStorage, &Layout), n: usize) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let xv = data_of::<T>(x.0, x.1, "column_sum")?;
    check_len(xv.len(), "column_sum")?;
    let rows = xv.len() / n.max(1);
    if rows == 0 || n == 0 {
        return zeros_of::<T>(dev, n);
    }
    let (cfg, chunks) = columns_cfg(rows, n);
    // SAFETY: the partial kernel writes all chunks·n entries, the sum all n outputs.
    let partial = unsafe { dev.alloc::<f32>(chunks * n)? };
    let mut total = unsafe { dev.alloc::<f32>(n)? };
    let f = kernel!(dev, &name_for::<T>("vl_column_sum_partial"));
    let (ri, ni) = (rows as i32, n as i32);
    let mut bld = f.builder();
    bld.arg(&xv).arg(&partial).arg(&ri).arg(&ni);
    // SAFETY: threads guard j < n and each chunk's rows < rows.
    unsafe { bld.launch(cfg) }.w()?;
    {
        let mut all = total.slice_mut(0..n);
        sum_chunks(dev, &partial, &mut all, chunks, n)?;
    }
    if T::DTYPE == DType::F32 {
        return Ok(wrap(total, dev));
    }
    // SAFETY: the rounding kernel writes all n outputs.
    let out = unsafe { dev.alloc::<T>(n)? };
    let f = kernel!(dev, "vl_round_bf16");
    let l = n as u64;
    let mut bld = f.builder();
    bld.arg(&total).arg(&out).arg(&l);
    // SAFETY: grid-stride loop bounded by n.
    unsafe { bld.launch(elems_cfg(n)) }.w()?;
    Ok(wrap(out, dev))
}

/// Attention probabilities in mixed precision: rows of `n` bfloat16 scores (row r of `B·H·Tq`)
/// → softmax(scale·x + mask[b][q]) as bfloat16, `mask` `[B, Tq, n]` float32 or none, `hq` = H·Tq;
/// with `dy`, the backward instead: `dx = scale · p ⊙ (dy − Σ dy ⊙ p)`, p recomputed from `x`.
pub fn attn_softmax_bf16(
    x: (&CudaStorage, &Layout),
    mask: Option<(&CudaStorage, &Layout)>,
    dy: Option<(&CudaStorage, &Layout)>,
    n: usize,
    scale: f32,
    hq: usize,
    q_len: usize,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let xv = data_of::<bf16>(x.0, x.1, "attn_softmax")?;
    let gv = dy
        .map(|(s, l)| data_of::<bf16>(s, l, "attn_softmax_bwd"))
        .transpose()?;
    let len = xv.len();
    check_len(len, "attn_softmax")?;
    if len == 0 || n == 0 {
        return zeros_of::<bf16>(dev, len);
    }
    if let Some(g) = &gv {
        if g.len() != len {
            bail!("attn_softmax_bwd: {} gradients for {len} scores", g.len());
        }
    }
    let mv = mask_of(mask, len / n, n, hq, q_len)?;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<bf16>(len)? };
    let name = match gv {
        None => "vl_attn_softmax_fwd_bf16",
        Some(_) => "vl_attn_softmax_bwd_bf16",
    };
    let f = kernel!(dev, name);
    let (ni, hqi, qi) = (n as i32, hq as i32, q_len as i32);
    let null = 0u64;
    let mut bld = f.builder();
    bld.arg(&xv);
    match &mv {
        Some(m) => bld.arg(m),
        None => bld.arg(&null),
    };
    if let Some(g) = &gv {
        bld.arg(g);
    }
    bld.arg(&out).arg(&ni).arg(&scale).arg(&hqi).arg(&qi);
    // SAFETY: one block per row of n elements; mask rows indexed within [B, Tq, n] (checked).
    unsafe { bld.launch(rows_cfg(len / n)) }.w()?;
    Ok(wrap(out, dev))
}

/// The contiguous float32 data of `s` under `l`, to write in place.
fn data_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: the tensor updated in place must be contiguous");
    };
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

/// AdamW's moment update in place (train/adamw_fused.rs's `Moment`): `m ← m·β + g·(1 − β)`,
/// `g²` for the second moment (`square`); float32, contiguous, one length.
pub fn adamw_moment(
    m: (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    (beta, one_minus_beta): (f32, f32),
    square: bool,
) -> Result<()> {
    let dev = m.0.device.clone();
    let gv = data(g.0, g.1, "adamw moment")?;
    let mut mv = data_mut(m.0, m.1, "adamw moment")?;
    let len = mv.len();
    if gv.len() != len {
        bail!("adamw moment: {} gradients for {len} values", gv.len());
    }
    if len == 0 {
        return Ok(());
    }
    let f = kernel!(dev, "vl_adamw_moment");
    let (l, sq) = (len as u64, square as i32);
    let mut bld = f.builder();
    bld.arg(&mut mv)
        .arg(&gv)
        .arg(&l)
        .arg(&beta)
        .arg(&one_minus_beta)
        .arg(&sq);
    // SAFETY: grid-stride loop bounded by len, both buffers of len elements.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(())
}

/// The settings of one AdamW step for [`adamw_step`] (train/adamw_fused.rs's `Step`, in f32):
/// the decay factor `1 − lr·λ` (`None`: not decayed), `1/√(1 − β₂ᵗ)`, ε and `lr / (1 − β₁ᵗ)`.
pub struct AdamwStep {
    pub decay: Option<f32>,
    pub inv_bc2_sqrt: f32,
    pub eps: f32,
    pub rate: f32,
}

/// AdamW's step in place: `θ ← θ·(1 − lr·λ) − m / (√v / √(1 − β₂ᵗ) + ε) · lr / (1 − β₁ᵗ)`;
/// float32, contiguous, one length.
pub fn adamw_step(
    theta: (&mut CudaStorage, &Layout),
    m: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    s: &AdamwStep,
) -> Result<()> {
    let dev = theta.0.device.clone();
    let (mv, vv) = (data(m.0, m.1, "adamw step")?, data(v.0, v.1, "adamw step")?);
    let mut tv = data_mut(theta.0, theta.1, "adamw step")?;
    let len = tv.len();
    if mv.len() != len || vv.len() != len {
        bail!(
            "adamw step: moments of {} and {} values for {len}",
            mv.len(),
            vv.len()
        );
    }
    if len == 0 {
        return Ok(());
    }
    let f = kernel!(dev, "vl_adamw_step");
    let (l, decayed, decay) = (len as u64, s.decay.is_some() as i32, s.decay.unwrap_or(1.0));
    let mut bld = f.builder();
    bld.arg(&mut tv)
        .arg(&mv)
        .arg(&vv)
        .arg(&l)
        .arg(&decayed)
        .arg(&decay)
        .arg(&s.inv_bc2_sqrt)
        .arg(&s.eps)
        .arg(&s.rate);
    // SAFETY: grid-stride loop bounded by len, the three buffers of len elements.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(())
}

/// `total + Σ g²` (one float64) for the gradient norm (train/sumsq_fused.rs): float64 block
/// partials over `sumsq_cfg`, then their total in block order onto `total` (one float64).
pub fn sumsq(g: (&CudaStorage, &Layout), total: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let dev = &g.0.device;
    let gv = data(g.0, g.1, "sumsq")?;
    let tv = data_of::<f64>(total.0, total.1, "sumsq")?;
    if tv.len() != 1 {
        bail!(
            "sumsq: a running total of {} values (one expected)",
            tv.len()
        );
    }
    let len = gv.len();
    let cfg = sumsq_cfg(len);
    let blocks = cfg.grid_dim.0;
    // SAFETY: block b writes partial[b]; the total kernel writes out[0].
    let (partial, out) = unsafe { (dev.alloc::<f64>(blocks as usize)?, dev.alloc::<f64>(1)?) };
    let f = kernel!(dev, "vl_sumsq_partial");
    let l = len as u64;
    let mut bld = f.builder();
    bld.arg(&gv).arg(&l).arg(&partial);
    // SAFETY: grid-stride loop bounded by len; one partial per block of the grid.
    unsafe { bld.launch(cfg) }.w()?;
    let f = kernel!(dev, "vl_sumsq_total");
    let bi = blocks as i32;
    let mut bld = f.builder();
    bld.arg(&partial).arg(&bi).arg(&tv).arg(&out);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: thread 0 of the one block reads `blocks` partials and one total, writes one.
    unsafe { bld.launch(one) }.w()?;
    Ok(wrap(out, dev))
}

/// `x + h` in float32 for float32 `x` and bfloat16 `h` of one length (mixed precision's
/// residual add).
pub fn add_widened(x: (&CudaStorage, &Layout), h: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, hv) = (
        data(x.0, x.1, "residual add")?,
        data_of::<bf16>(h.0, h.1, "residual add")?,
    );
    let len = xv.len();
    if hv.len() != len {
        bail!("residual add: {} values onto {len}", hv.len());
    }
    if len == 0 {
        return zeros(dev, 0);
    }
    // SAFETY: every element is written by the grid-stride kernel.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let f = kernel!(dev, "vl_add_widened_bf16");
    let l = len as u64;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&hv).arg(&y).arg(&l);
    // SAFETY: grid-stride loop bounded by len, the three buffers of len elements.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(wrap(y, dev))
}

/// The float32 mask `[B, Tq, n]` of `rows` = B·H·Tq score rows, its length checked.
fn mask_of<'a>(
    mask: Option<(&'a CudaStorage, &Layout)>,
    rows: usize,
    n: usize,
    hq: usize,
    q_len: usize,
) -> Result<Option<CudaView<'a, f32>>> {
    let Some((s, l)) = mask else {
        return Ok(None);
    };
    let m = data(s, l, "attn_softmax mask")?;
    if hq == 0 || q_len == 0 || !hq.is_multiple_of(q_len) || !rows.is_multiple_of(hq) {
        bail!("attn_softmax: {rows} score rows are not B·H·Tq with H·Tq = {hq}, Tq = {q_len}");
    }
    if m.len() != rows / hq * q_len * n {
        bail!(
            "attn_softmax: a mask of {} values for [B, Tq, n] = [{}, {q_len}, {n}]",
            m.len(),
            rows / hq
        );
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fused.cu compiles with NVRTC (no GPU needed: NVRTC is a library) and defines every kernel
    /// this file launches, in both element types where it has two. Runs in a `cuda` build's
    /// tests with libnvrtc on the library path (`$VLALIGN_CACHE/cu13/nvidia/cu13/lib`).
    #[test]
    fn nvrtc_compiles_every_kernel_the_launches_name() {
        let ptx = ptx().unwrap();
        let mut names = vec![
            "vl_sum_chunks".to_string(),
            "vl_softmax_fwd".into(),
            "vl_softmax_bwd".into(),
            "vl_round_bf16".into(),
            "vl_attn_softmax_fwd_bf16".into(),
            "vl_attn_softmax_bwd_bf16".into(),
            "vl_adamw_moment".into(),
            "vl_adamw_step".into(),
            "vl_sumsq_partial".into(),
            "vl_sumsq_total".into(),
            "vl_add_widened_bf16".into(),
        ];
        for base in [
            "vl_layer_norm_fwd",
            "vl_layer_norm_bwd_dx",
            "vl_layer_norm_bwd_partial",
            "vl_act_fwd",
            "vl_act_bwd",
            "vl_add_bias",
            "vl_column_sum_partial",
        ] {
            names.push(name_for::<f32>(base));
            names.push(name_for::<bf16>(base));
        }
        for name in names {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} is not in fused.cu's PTX"
            );
        }
    }
}
