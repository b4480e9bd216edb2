//! `y = x Wᵀ (+ b)` for a few rows of `x` (at most [`MAX_ROWS`]): a decoding step of an LM,
//! one token per sequence. The `gemm` crate tiles for large products; with 1–8 rows and `W`
//! read through its transpose it spent most of a greedy decode packing operands (~50% of
//! `vlalign bench --suite lm` in `perf`), and the product is bound by reading `W` once anyway.
//! Here each task takes four rows of `W` at a time and forms their dot products with every
//! row of `x` in 16-lane accumulators (4 × up to 8 of them: the 32 vector registers of
//! AVX-512), reading `W` exactly once. Tasks split `W`'s rows in fixed blocks, and each dot
//! product is summed in the same order whatever the threads, so results do not depend on them.
//! A frozen weight on the CPU is stored transposed (`[k, n]`, see `nn::linear`): for it,
//! [`product_cols`] streams `Wᵀ`'s rows front to back into partial sums added in a fixed order.

use rayon::prelude::*;

use super::vecmath;

/// The most rows of `x` this path takes.
pub const MAX_ROWS: usize = 8;

/// Lanes of an accumulator.
const LANES: usize = 16;

/// Rows of `W` a task's inner loop takes at once with 2–8 rows of `x` (twice as many with one:
/// more streams from memory at a time, 3.6 against 5.8 ms for SmolLM2's head), so that the
/// M·J accumulators stay in registers.
const W_ROWS: usize = 4;

/// Rows of `W` per parallel task.
const TASK_ROWS: usize = 64;

/// Dot products of `M` rows of `x` (rows of `k`, `x` holding exactly `M·k`) with the `J`
/// rows `w` (rows of `k`, holding exactly `J·k`) into `out[r][jj]`. Each lane accumulates with
/// a fused multiply-add (one rounding, the same in every build).
#[inline(always)]
fn block<const M: usize, const J: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [[f32; J]; M]) {
    assert!(x.len() >= M * k && w.len() >= J * k);
    let mut acc = [[[0f32; LANES]; J]; M];
    let whole = k / LANES * LANES;
    // The LANES elements of `v` from `at`.
    let lanes = |v: &[f32], at: usize| -> [f32; LANES] {
        debug_assert!(at + LANES <= v.len());
        // SAFETY: `at + LANES` ≤ `v.len()`: every `at` below is `row·k + i` with `row` < M (or
        // J) and `i + LANES` ≤ `whole` ≤ `k`, and the lengths are asserted above. Unchecked so
        // that the loop has no exits and the M·J accumulators stay in registers (with slice
        // checks the compiler stored every one of them to the stack at every step: 27 GFLOP/s).
        unsafe { std::ptr::read_unaligned(v.as_ptr().add(at) as *const [f32; LANES]) }
    };
    let mut i = 0;
    while i < whole {
        for (r, ar) in acc.iter_mut().enumerate() {
            let xr = lanes(x, r * k + i);
            for (jj, a) in ar.iter_mut().enumerate() {
                let wr = lanes(w, jj * k + i);
                for l in 0..LANES {
                    a[l] = xr[l].mul_add(wr[l], a[l]);
                }
            }
        }
        i += LANES;
    }
    for (r, ar) in acc.iter_mut().enumerate() {
        for (jj, a) in ar.iter_mut().enumerate() {
            for (l, i) in (whole..k).enumerate() {
                a[l] = x[r * k + i].mul_add(w[jj * k + i], a[l]);
            }
            out[r][jj] = vecmath::fold_lanes(*a);
        }
    }
}

/// One task: `W` rows `w` (a multiple of `W_ROWS` of them, or the tail) against all `H·M` rows
/// of `x`, `M` at a time while a block of `J` rows of `W` is in the L1 cache; `y[r][j]` for this
/// task's `j`s written into `cols` (`H·M` rows of `w.len() / k`).
#[inline(always)]
fn task<const M: usize, const J: usize, const H: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    cols: &mut [f32],
) {
    let n = w.len() / k;
    let mut out = [[0f32; J]; M];
    let mut put = |h: usize, out: &[[f32; J]; M], j: usize, width: usize| {
        for (r, o) in out.iter().enumerate() {
            let row = (h * M + r) * n;
            cols[row + j..row + j + width].copy_from_slice(&o[..width]);
        }
    };
    let mut j = 0;
    while j + J <= n {
        for h in 0..H {
            block::<M, J>(
                &x[h * M * k..(h + 1) * M * k],
                &w[j * k..(j + J) * k],
                k,
                &mut out,
            );
            put(h, &out, j, J);
        }
        j += J;
    }
    // The last rows of W (fewer than J), one at a time as a zero-padded block.
    while j < n {
        let mut padded = vec![0f32; J * k];
        padded[..k].copy_from_slice(&w[j * k..(j + 1) * k]);
        for h in 0..H {
            block::<M, J>(&x[h * M * k..(h + 1) * M * k], &padded, k, &mut out);
            put(h, &out, j, 1);
        }
        j += 1;
    }
}

vecmath::multiversion! {
    /// [`task`] for `m` rows (1, 2, 4 or 8: `x` zero-padded to that many by the caller).
    fn task_rows(m: usize, x: &[f32], w: &[f32], k: usize, cols: &mut [f32]) {
        match m {
            1 => task::<1, { 2 * W_ROWS }, 1>(x, w, k, cols),
            2 => task::<2, W_ROWS, 1>(x, w, k, cols),
            4 => task::<4, W_ROWS, 1>(x, w, k, cols),
            // Eight rows' 8·J accumulators would not stay in registers (the compiler spilled
            // them to the stack at every step: 15% of a batch-8 decode's `x Wᵀ` speed).
            _ => task::<4, W_ROWS, 2>(x, w, k, cols),
        }
    }
}

/// `x Wᵀ (+ b)`: `x` `[rows, k]` with 1 ≤ rows ≤ [`MAX_ROWS`], `w` `[n, k]`, `b` `[n]`; returns
/// `[rows, n]`.
pub(super) fn product(rows: usize, k: usize, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    assert!(
        (1..=MAX_ROWS).contains(&rows) && x.len() == rows * k && w.len().is_multiple_of(k.max(1))
    );
    let n = w.len().checked_div(k).unwrap_or(0);
    // Rows rounded up to a kernel size; the padding rows are zeros and their results dropped.
    let m = rows.next_power_of_two();
    let mut xp = vec![0f32; m * k];
    xp[..rows * k].copy_from_slice(x);
    // Each task's results, [m, its n], in task order.
    let parts: Vec<Vec<f32>> = match k {
        0 => Vec::new(),
        _ => w
            .par_chunks(TASK_ROWS * k)
            .map(|wc| {
                let mut cols = vec![0f32; m * (wc.len() / k)];
                task_rows(m, &xp, wc, k, &mut cols);
                cols
            })
            .collect(),
    };
    let mut y = vec![0f32; rows * n];
    let mut j0 = 0;
    for p in &parts {
        let nj = p.len() / m;
        for r in 0..rows {
            y[r * n + j0..r * n + j0 + nj].copy_from_slice(&p[r * nj..(r + 1) * nj]);
        }
        j0 += nj;
    }
    if let Some(b) = b {
        super::fused::add_rows(&mut y, b);
    }
    y
}

/// Rows of `Wᵀ` per parallel task with `W` stored transposed.
const TASK_K: usize = 32;

/// The most rows [`product_cols`] is used for: with `W` read from memory it beat the `gemm`
/// crate by 10–25% up to 4 rows and lost by up to 35% at 8 (SmolLM2's shapes, 2 threads).
pub const COLS_MAX_ROWS: usize = 4;

vecmath::multiversion! {
    /// `y[r] += Σ x[r][i0 + ii] · wc[ii]` over the rows `wc[ii]` (each `n` long) of one task's
    /// block of `Wᵀ`, for the `m` rows of `x` (rows of `k`) into `y` (`[m, n]`): `Wᵀ` read once,
    /// front to back, one fused multiply-add per term in the order of `ii`.
    fn cols_block(m: usize, x: &[f32], k: usize, i0: usize, wc: &[f32], n: usize, y: &mut [f32]) {
        for (ii, wrow) in wc.chunks_exact(n).enumerate() {
            for (r, yr) in y.chunks_exact_mut(n).take(m).enumerate() {
                let xv = x[r * k + i0 + ii];
                for (yv, wv) in yr.iter_mut().zip(wrow) {
                    *yv = xv.mul_add(*wv, *yv);
                }
            }
        }
    }
}

/// [`product`] with `W` stored transposed (`wt` `[k, n]`, see `nn::linear`): each task takes
/// [`TASK_K`] consecutive rows of `Wᵀ` — contiguous memory, streamed once — into a partial `y`,
/// and the partials are added in task order, so the result does not depend on the threads.
pub(super) fn product_cols(
    rows: usize,
    k: usize,
    x: &[f32],
    wt: &[f32],
    b: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        (1..=MAX_ROWS).contains(&rows) && x.len() == rows * k && wt.len().is_multiple_of(k.max(1))
    );
    let n = wt.len().checked_div(k).unwrap_or(0);
    let mut y = match b {
        Some(b) => b.repeat(rows),
        None => vec![0f32; rows * n],
    };
    if n == 0 {
        return y;
    }
    let parts: Vec<Vec<f32>> = wt
        .par_chunks(TASK_K * n)
        .enumerate()
        .map(|(t, wc)| {
            let mut part = vec![0f32; rows * n];
            cols_block(rows, x, k, t * TASK_K, wc, n, &mut part);
            part
        })
        .collect();
    for p in &parts {
        for (yv, pv) in y.iter_mut().zip(p) {
            *yv += pv;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 dot products, for every row count, a k with a lane tail and an n with a
    /// W_ROWS tail and a task tail, with and without bias.
    #[test]
    fn few_rows_match_f64_dot_products() {
        let (k, n) = (37, 4 * TASK_ROWS / 2 + 70 + 3);
        let val = |i: usize| ((i * 7919) % 113) as f32 / 56.0 - 1.0;
        let w: Vec<f32> = (0..n * k).map(|i| val(i + 5)).collect();
        let b: Vec<f32> = (0..n).map(|i| val(i * 3)).collect();
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        for rows in 1..=MAX_ROWS {
            let x: Vec<f32> = (0..rows * k).map(val).collect();
            for bias in [None, Some(&b[..])] {
                let y = product(rows, k, &x, &w, bias);
                // The same product with W stored transposed.
                let y_cols = product_cols(rows, k, &x, &wt, bias);
                for r in 0..rows {
                    for j in 0..n {
                        let mut e: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                            .sum();
                        e += bias.map_or(0.0, |b| b[j] as f64);
                        for got in [y[r * n + j], y_cols[r * n + j]] {
                            let got = got as f64;
                            assert!(
                                (got - e).abs() < 1e-5,
                                "rows {rows} [{r},{j}]: {got} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}
