//! exp and erf for float32 slices, written branch-free so that the compiler vectorises the loops,
//! and compiled twice: for the baseline x86-64 the binary targets and, chosen at run time when
//! the CPU has them, for AVX2 + FMA (8 lanes). libm's scalar `expf`/`erff` were ~10% of a train
//! step (DESIGN.md §2); PyTorch's CPU kernels use vectorised approximations the same way.
//!
//! Accuracy (float32, against double-precision `exp`/`erf`): [`exp`] is the Cephes `expf`
//! scheme (range reduction by ln 2 split in two, a degree-6 polynomial, the exponent set in the
//! bits), within 2 ulp on [-87, 88]; [`erf`] is `x·P(x²)` below 1 and `1 − e^(−x²)·Q(1/x)` up to
//! 4 (P, Q least-squares fits to erf(x)/x and erfc(x)·e^(x²) made for this file; e^(−x²) is
//! formed from the exact split x = h + l as e^(−h²)·e^(−l(h+x)), as FreeBSD's `erff` does, the
//! second factor by its cubic Taylor polynomial), within
//! 3 ulp on [-6, 6] (libm's erff: 1 ulp; PyTorch's vectorised erf: 1.5e-7 absolute, the same).
//! The tests check both against `f64` on dense grids.

/// e^x for one lane (inlined into the vectorised loops). Below −87.3 it returns 0 (the true
/// value is subnormal there, and a subnormal fed to a gemm or an FMA costs a microcode assist
/// per use on Intel cores: a causal mask's softmax probabilities made the masked attention ~4×
/// slower than the unmasked); above 88.7 it saturates at ~3e38 instead of inf; NaN in gives a
/// finite value, so callers whose result must carry a NaN multiply by `x` (the activations do).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO with LN2_HI exact in few bits, so n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.7);
    // k's bits hold n in their low mantissa bits (k = 1.5·2²³ + n exactly, |n| < 2²²), read
    // below as an integer: a float-to-int `as` cast would not vectorise (its NaN and saturation
    // rules make LLVM convert lane by lane).
    let k = x * LOG2E + ROUND;
    let n = k - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ: the biased exponent n + 127 = k's bits − (ROUND's bits − 127), shifted into place.
    let e = e * f32::from_bits(k.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    if underflow {
        0.0
    } else {
        e
    }
}

/// erf(x)/x = P(x²) on [0, 1] (highest power first).
const ERF_SMALL: [f32; 7] = [
    8.006_646e-5,
    -8.053_692e-4,
    5.192_952e-3,
    -2.685_606_7e-2,
    1.128_363_5e-1,
    -3.761_263e-1,
    std::f32::consts::FRAC_2_SQRT_PI,
];

/// erfc(x)·e^(x²) = Q(1/x) on [1, 4] (highest power first).
const ERFC_SCALED: [f32; 10] = [
    2.999_424e-2,
    -1.750_636_7e-1,
    4.254_124_2e-1,
    -5.170_658e-1,
    2.192_375_2e-1,
    2.421_846_1e-1,
    -3.805_414_7e-1,
    2.168_639_6e-2,
    5.616_089e-1,
    1.305_089_4e-4,
];

#[inline(always)]
fn horner<const N: usize>(c: &[f32; N], t: f32) -> f32 {
    let mut r = c[0];
    for &k in &c[1..] {
        r = r * t + k;
    }
    r
}

/// erf(x) for one lane (inlined into the vectorised loops); both branches are computed and one
/// selected, so the loop has no branch.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let small = x * horner(&ERF_SMALL, x * x);
    let c = a.clamp(1.0, 4.0);
    // c = h + l with h's low 12 mantissa bits cleared: h² is exact and l(h + c) = c² − h².
    let h = f32::from_bits(c.to_bits() & 0xFFFF_F000);
    let l = c - h;
    // e^(−t) for the small t = l(h + c) < 2⁻¹⁰·8: a cubic, exact to 2e-10.
    let t = l * (h + c);
    let e = exp(-h * h) * (1.0 - t * (1.0 - t * (0.5 - t * (1.0 / 6.0))));
    let large = (1.0 - e * horner(&ERFC_SCALED, 1.0 / c)).copysign(x);
    if a < 1.0 {
        small
    } else {
        large
    }
}

/// The 16 running lanes of `op` over f(i) for i < n: term i goes into lane i mod 16, each lane
/// starting at `init`. The lanes vectorise where a single running value would wait on each step.
#[inline(always)]
fn lane_fold(
    n: usize,
    init: f32,
    f: impl Fn(usize) -> f32,
    op: impl Fn(f32, f32) -> f32,
) -> [f32; 16] {
    let mut acc = [init; 16];
    let whole = n / 16 * 16;
    let mut base = 0;
    while base < whole {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = op(*a, f(base + l));
        }
        base += 16;
    }
    for (l, i) in (whole..n).enumerate() {
        acc[l] = op(acc[l], f(i));
    }
    acc
}

/// Σ f(i) for i < n in a fixed association: 16 running lanes (term i into lane i mod 16), then
/// the lanes folded in halves (8 onto 8, 4 onto 4, 2, 1). Every build gives the same bits.
#[inline(always)]
pub fn sum_of(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    fold_lanes(lane_fold(n, 0.0, f, |a, b| a + b))
}

/// Values a parallel task of the element-wise CPU kernels covers: enough to amortise its
/// scheduling.
pub const TASK_VALUES: usize = 65_536;

/// Whole items of `len` values per parallel task: about [`TASK_VALUES`] values, at least one
/// item.
pub fn items_per_task(len: usize) -> usize {
    (TASK_VALUES / len.max(1)).max(1)
}

/// The element-wise sum of `parts` (each `len` long), added in their order: how the kernels'
/// partial sums per fixed chunk are totalled, so that a result does not depend on the threads
/// (rayon's `reduce` would associate them by work-stealing).
pub fn add_in_order<T: Copy + Default + std::ops::AddAssign>(
    parts: Vec<Vec<T>>,
    len: usize,
) -> Vec<T> {
    let mut total = vec![T::default(); len];
    for part in parts {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    total
}

/// The sum of 16 lanes folded in halves (8 onto 8, 4 onto 4, 2, 1): a fixed association.
#[inline(always)]
pub fn fold_lanes(mut acc: [f32; 16]) -> f32 {
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// max f(i) for i < n (−∞ for none; NaN terms ignored, as `f32::max` does) in 16 running lanes.
/// A maximum is exact, so the result is the in-order one whatever the association.
#[inline(always)]
pub fn max_of(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let acc = lane_fold(n, f32::NEG_INFINITY, f, f32::max);
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Defines `fn $name(args) body` three times over — as built (baseline x86-64, or any other
/// architecture), for AVX2 + FMA and for AVX-512 — and makes `$name` run the widest this CPU
/// has. The body is inlined into each (`#[inline(always)]`), so the loops in it vectorise 4, 8
/// or 16 lanes wide; all give the same bits (Rust never contracts `a * b + c` into an FMA, nor
/// reorders a float sum).
/// Write the body's loops over indices: an iterator adapter's `fold` may stay out of line,
/// compiled for the baseline only.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(ours: f32, exact: f64) -> f64 {
        let spacing = {
            let e = exact.abs() as f32;
            (f32::from_bits(e.to_bits() + 1) - e) as f64
        };
        (ours as f64 - exact).abs() / spacing
    }

    #[test]
    fn exp_is_within_2_ulp() {
        let mut worst = 0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max(ulps(exp(x), (x as f64).exp()));
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_is_within_3_ulp_and_odd() {
        let mut worst = 0f64;
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            worst = worst.max(ulps(erf(x), libm::erf(x as f64)));
            assert_eq!(erf(-x), -erf(x));
        }
        // Tiny arguments (erf(x) ≈ 2x/√π): relative accuracy holds there too.
        for i in 0..200 {
            let x = 1e-30f32 * 1.5f32.powi(i);
            worst = worst.max(ulps(erf(x), libm::erf(x as f64)));
        }
        assert!(worst <= 3.0, "{worst} ulp");
        assert_eq!(erf(10.0), 1.0);
        // GELU of a NaN stays NaN (x multiplies the saturated erf).
        let x = f32::NAN;
        assert!((0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))).is_nan());
    }

    /// The lane maximum is the in-order one for every length up to 40, with NaN terms
    /// ignored and −∞ for none.
    #[test]
    fn max_of_is_the_in_order_maximum() {
        let xs: Vec<f32> = (0..40)
            .map(|i| match i % 7 {
                3 => f32::NAN,
                5 => f32::NEG_INFINITY,
                _ => ((i * 37) % 23) as f32 - 11.5,
            })
            .collect();
        for n in 0..=xs.len() {
            let want = xs[..n].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max_of(n, |i| xs[i]).to_bits(), want.to_bits(), "n = {n}");
        }
        assert_eq!(max_of(3, |_| f32::NAN), f32::NEG_INFINITY);
    }

    #[inline(always)]
    fn both(x: &[f32], out: &mut [u32]) {
        let out = &mut out[..x.len()];
        for i in 0..x.len() {
            out[i] = erf(x[i]).to_bits() ^ exp(x[i]).to_bits() ^ lanes(x, i);
        }
    }

    /// The lane sum of the `i mod 40` values before `i`.
    #[inline(always)]
    fn lanes(x: &[f32], i: usize) -> u32 {
        let from = i.saturating_sub(i % 40);
        sum_of(i - from, |j| x[from + j]).to_bits()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn both_avx2(x: &[f32], out: &mut [u32]) {
        both(x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn both_avx512(x: &[f32], out: &mut [u32]) {
        both(x, out)
    }

    /// The builds `multiversion!` makes, each run where this CPU has its features, give the
    /// scalar bits for exp, erf and the lane sum (the range reaches exp's underflow to 0 and its
    /// saturation; the sums run over 0 to 39 terms).
    #[test]
    fn every_vector_build_gives_the_same_bits() {
        let xs: Vec<f32> = (-4000..4000)
            .map(|i| i as f32 * 1.37e-3)
            .chain((-1000..1000).map(|i| i as f32 * 0.1))
            .collect();
        let scalar: Vec<u32> = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| erf(x).to_bits() ^ exp(x).to_bits() ^ lanes(&xs, i))
            .collect();
        assert_eq!(exp(-87.4), 0.0);
        assert!(exp(-87.2) >= f32::MIN_POSITIVE);
        #[cfg(target_arch = "x86_64")]
        {
            let detected = |fs: &[&str]| {
                fs.iter().all(|f| match *f {
                    "avx2" => std::is_x86_feature_detected!("avx2"),
                    "fma" => std::is_x86_feature_detected!("fma"),
                    "avx512f" => std::is_x86_feature_detected!("avx512f"),
                    "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
                    "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
                    _ => std::is_x86_feature_detected!("avx512dq"),
                })
            };
            let mut vector = vec![0u32; xs.len()];
            if detected(&["avx2", "fma"]) {
                // SAFETY: the CPU has the features.
                unsafe { both_avx2(&xs, &mut vector) };
                assert_eq!(scalar, vector, "avx2");
            }
            if detected(&["avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"]) {
                // SAFETY: the CPU has the features.
                unsafe { both_avx512(&xs, &mut vector) };
                assert_eq!(scalar, vector, "avx512");
            }
        }
    }
}
