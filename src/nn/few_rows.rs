//! `y = x Wᵀ (+ b)` for a few rows of `x` (at most [`MAX_ROWS`]): a decoding step of an LM,
//! one token per sequence. The `gemm` crate tiles for large products; with 1–8 rows and `W`
//! read through its transpose it spent most of a greedy decode packing operands (~50% of
//! `vlalign bench --suite lm` in `perf`), and the product is bound by reading `W` once anyway.
//! Here each task takes four rows of `W` at a time and forms their dot products with every
//! row of `x` in 16-lane accumulators (4 × up to 8 of them: the 32 vector registers of
//! AVX-512), reading `W` exactly once. Tasks split `W`'s rows in fixed blocks, and each dot
//! product is summed in the same order whatever the threads, so results do not depend on them.

use rayon::prelude::*;

use super::vecmath;

/// The most rows of `x` this path takes.
pub const MAX_ROWS: usize = 8;

/// Lanes of an accumulator.
const LANES: usize = 16;

/// Rows of `W` a task's inner loop takes at most at once (fewer with more rows of `x`, so that
/// the M·J accumulators stay in registers).
const W_ROWS: usize = 4;

/// Rows of `W` per parallel task.
const TASK_ROWS: usize = 64;

/// Dot products of `M` rows of `x` (rows of `k`, `x` holding exactly `M·k`) with the `J`
/// rows `w` (rows of `k`, holding exactly `J·k`) into `out[r][jj]`. Each lane accumulates with
/// a fused multiply-add (one rounding, the same in every build).
#[inline(always)]
fn block<const M: usize, const J: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [[f32; J]; M]) {
    let mut acc = [[[0f32; LANES]; J]; M];
    let whole = k / LANES * LANES;
    let mut i = 0;
    while i < whole {
        for (r, ar) in acc.iter_mut().enumerate() {
            let xr = &x[r * k + i..r * k + i + LANES];
            for (jj, a) in ar.iter_mut().enumerate() {
                let wr = &w[jj * k + i..jj * k + i + LANES];
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

/// One task: `W` rows `w` (a multiple of `W_ROWS` of them, or the tail) against all `M` rows of
/// `x`; `y[r][j]` for this task's `j`s written into `cols` (`M` rows of `w.len() / k`).
#[inline(always)]
fn task<const M: usize, const J: usize>(x: &[f32], w: &[f32], k: usize, cols: &mut [f32]) {
    let n = w.len() / k;
    let mut out = [[0f32; J]; M];
    let mut j = 0;
    while j + J <= n {
        block::<M, J>(x, &w[j * k..(j + J) * k], k, &mut out);
        for (r, o) in out.iter().enumerate() {
            cols[r * n + j..r * n + j + J].copy_from_slice(o);
        }
        j += J;
    }
    // The last rows of W (fewer than J), one at a time as a zero-padded block.
    while j < n {
        let mut padded = vec![0f32; J * k];
        padded[..k].copy_from_slice(&w[j * k..(j + 1) * k]);
        block::<M, J>(x, &padded, k, &mut out);
        for (r, o) in out.iter().enumerate() {
            cols[r * n + j] = o[0];
        }
        j += 1;
    }
}

vecmath::multiversion! {
    /// [`task`] for `m` rows (1, 2, 4 or 8: `x` zero-padded to that many by the caller).
    fn task_rows(m: usize, x: &[f32], w: &[f32], k: usize, cols: &mut [f32]) {
        match m {
            1 => task::<1, W_ROWS>(x, w, k, cols),
            2 => task::<2, W_ROWS>(x, w, k, cols),
            4 => task::<4, W_ROWS>(x, w, k, cols),
            _ => task::<8, 2>(x, w, k, cols),
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
        for rows in 1..=MAX_ROWS {
            let x: Vec<f32> = (0..rows * k).map(val).collect();
            for bias in [None, Some(&b[..])] {
                let y = product(rows, k, &x, &w, bias);
                for r in 0..rows {
                    for j in 0..n {
                        let mut e: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                            .sum();
                        e += bias.map_or(0.0, |b| b[j] as f64);
                        let got = y[r * n + j] as f64;
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
