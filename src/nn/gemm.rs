//! Strided matrix products for the fused kernels, through the `gemm` crate (the kernels candle's
//! own CPU matmul calls).

use gemm::Parallelism;

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, each operand a pointer with (row, column) strides;
/// `accumulate` adds to what `dst` holds instead of overwriting it; `threads` > 1 splits the
/// product over rayon's pool (the split is over output tiles, so the result does not depend on
/// it).
///
/// # Safety
/// Every pointer must be valid for the elements its strides reach; `dst` must not alias the
/// inputs nor be touched by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    threads: usize,
) {
    let parallelism = match threads {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// `len` floats written by `fill` through the pointer it is given, without the zero-fill pass
/// `vec![0.0; len]` would cost (one memory pass per output tensor: ~4% of a train step).
///
/// # Safety
/// `fill` must write all `len` elements and read none it has not written.
pub(super) unsafe fn written(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(v.as_mut_ptr());
    v.set_len(len);
    v
}

/// `len` floats written by `fill`, which gets them as a slice left as the allocator gave them
/// (as candle's own `alloc_uninit` does for a CPU output): for a kernel that writes every
/// element before anything reads it, without the zero fill of `vec![0.0; len]` (a memory pass
/// per output: ~9% of a ResNet training step).
///
/// # Safety
/// `fill` must write all `len` elements, and read none it has not written.
pub(super) unsafe fn filled(len: usize, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    fill(std::slice::from_raw_parts_mut(v.as_mut_ptr(), len));
    v.set_len(len);
    v
}
