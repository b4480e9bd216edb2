//! The CUDA side of fused.rs (cargo feature `cuda`): fused.cu compiled once per process by
//! NVRTC (so no nvcc is needed at build or run time for our kernels) and launched on the
//! tensor's stream. Each function takes contiguous float32 storage and returns new storage.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result};

const SRC: &str = include_str!("fused.cu");
/// Threads per block (fused.cu's BLOCK) and rows per column-sum chunk (ROWS_PER_CHUNK).
const BLOCK: u32 = 256;
const ROWS_PER_CHUNK: usize = 64;

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
fn data<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let slice = s.as_cuda_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!("{op}: input must be contiguous"),
    }
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

/// Grid over (column blocks, row chunks) for the column-sum kernels.
fn columns_cfg(rows: usize, n: usize) -> (LaunchConfig, usize) {
    let chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize) as u32, chunks as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, chunks)
}

fn wrap(slice: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// `len` zeros: the result of an op on an empty tensor (a launch with an empty grid would fail).
fn zeros(dev: &CudaDevice, len: usize) -> Result<CudaStorage> {
    Ok(wrap(dev.alloc_zeros::<f32>(len)?, dev))
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

/// LayerNorm forward over rows of `n`.
pub fn layer_norm(
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
    let rows = len / n.max(1);
    if rows == 0 {
        return zeros(dev, len);
    }
    // SAFETY: every element is written by the kernel before it is read.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let f = kernel!(dev, "vl_layer_norm_fwd");
    let ni = n as i32;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&wv).arg(&bv).arg(&y).arg(&ni).arg(&eps);
    // SAFETY: one block per row of n elements, within the buffers above.
    unsafe { bld.launch(rows_cfg(rows)) }.w()?;
    Ok(wrap(y, dev))
}

/// LayerNorm backward, packed `[dx (rows·n), dw (n), db (n)]` as fused.rs's CPU kernel.
pub fn layer_norm_bwd(
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
        data(dy.0, dy.1, "layer_norm_bwd")?,
    );
    let len = xv.len();
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
        let f = kernel!(dev, "vl_layer_norm_bwd_dx");
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
    let f = kernel!(dev, "vl_layer_norm_bwd_partial");
    let ri = rows as i32;
    let mut bld = f.builder();
    bld.arg(&xv)
        .arg(&gv)
        .arg(&stats)
        .arg(&partial)
        .arg(&ri)
        .arg(&ni);
    // SAFETY: threads guard j < n and rows < rows.
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

/// Elementwise activation `act` (0 quick_gelu, 1 gelu_erf).
pub fn activation(x: (&CudaStorage, &Layout), act: i32) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let xv = data(x.0, x.1, "activation")?;
    let len = xv.len();
    if len == 0 {
        return zeros(dev, 0);
    }
    // SAFETY: every element is written by the grid-stride kernel.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let f = kernel!(dev, "vl_act_fwd");
    let l = len as u64;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&y).arg(&l).arg(&act);
    // SAFETY: grid-stride loop bounded by len.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(wrap(y, dev))
}

/// `dx = dy ⊙ act'(x)`.
pub fn activation_bwd(
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    act: i32,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, gv) = (
        data(x.0, x.1, "activation_bwd")?,
        data(dy.0, dy.1, "activation_bwd")?,
    );
    let len = xv.len();
    if len == 0 {
        return zeros(dev, 0);
    }
    // SAFETY: every element is written by the grid-stride kernel.
    let dx = unsafe { dev.alloc::<f32>(len)? };
    let f = kernel!(dev, "vl_act_bwd");
    let l = len as u64;
    let mut bld = f.builder();
    bld.arg(&xv).arg(&gv).arg(&dx).arg(&l).arg(&act);
    // SAFETY: grid-stride loop bounded by len.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(wrap(dx, dev))
}

/// `x + b` with `b` (length `n`) broadcast over rows.
pub fn add_bias(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    n: usize,
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, bv) = (data(x.0, x.1, "add_bias")?, data(b.0, b.1, "add_bias")?);
    let len = xv.len();
    if len == 0 || n == 0 {
        return zeros(dev, len);
    }
    // SAFETY: every element is written by the grid-stride kernel.
    let y = unsafe { dev.alloc::<f32>(len)? };
    let f = kernel!(dev, "vl_add_bias");
    let (l, ni) = (len as u64, n as i32);
    let mut bld = f.builder();
    bld.arg(&xv).arg(&bv).arg(&y).arg(&l).arg(&ni);
    // SAFETY: grid-stride loop bounded by len; b is indexed modulo n.
    unsafe { bld.launch(elems_cfg(len)) }.w()?;
    Ok(wrap(y, dev))
}

/// Σ over rows of a `[rows, n]` buffer → `[n]`, in fixed chunks added in order.
pub fn column_sum(x: (&CudaStorage, &Layout), n: usize) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let xv = data(x.0, x.1, "column_sum")?;
    let rows = xv.len() / n.max(1);
    if rows == 0 || n == 0 {
        return zeros(dev, n);
    }
    let (cfg, chunks) = columns_cfg(rows, n);
    // SAFETY: the partial kernel writes all chunks·n entries, the sum all n outputs.
    let partial = unsafe { dev.alloc::<f32>(chunks * n)? };
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let f = kernel!(dev, "vl_column_sum_partial");
    let (ri, ni) = (rows as i32, n as i32);
    let mut bld = f.builder();
    bld.arg(&xv).arg(&partial).arg(&ri).arg(&ni);
    // SAFETY: threads guard j < n and the chunk's rows < rows.
    unsafe { bld.launch(cfg) }.w()?;
    {
        let mut all = out.slice_mut(0..n);
        sum_chunks(dev, &partial, &mut all, chunks, n)?;
    }
    Ok(wrap(out, dev))
}
