//! Antialiased separable resampling of 8-bit RGB images with Pillow's semantics
//! (`Image.resize` with `reducing_gap=None`; Pillow's libImaging/Resample.c), which both
//! transformers backends reproduce: the PIL one calls it, and torchvision's uint8 bicubic
//! antialias kernel was written to match it.
//!
//! Per axis: each output sample is a normalised weighted sum over a window whose filter support
//! is widened by the downscale factor (the antialiasing), weights in 22-bit fixed point, the
//! horizontal pass first, each pass rounded and clamped to 8 bits.

/// Interpolation filter, numbered as PIL's `resample` values in `preprocessor_config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// PIL 2: triangle filter, support 1.
    Bilinear,
    /// PIL 3: Keys cubic with a = -0.5, support 2.
    Bicubic,
}

impl Filter {
    /// From PIL's resample code; `None` for filters we do not implement.
    pub fn from_pil(code: u32) -> Option<Self> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point weights of one axis: output `i` reads `count[i]` inputs from `first[i]`.
struct Axis {
    first: Vec<usize>,
    count: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

fn axis(in_size: usize, out_size: usize, filter: Filter) -> Axis {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut count = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero, as `as i64` does.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi.saturating_sub(lo).min(ksize);
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = filter.weight((x as f64 + lo as f64 - center + 0.5) / filterscale);
            total += *wx;
        }
        for x in 0..n {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            // Round half away from zero into fixed point.
            let f = v * (1i64 << PRECISION_BITS) as f64;
            weights[o * ksize + x] = (if f < 0.0 { f - 0.5 } else { f + 0.5 }) as i32;
        }
        first.push(lo);
        count.push(n);
    }
    Axis {
        first,
        count,
        ksize,
        weights,
    }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved RGB8 buffer `(w, h)` to `(out_w, out_h)`.
pub fn resize_rgb8(
    src: &[u8],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(src.len(), w * h * 3, "RGB buffer size");
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width is unchanged), into rows [0, h).
    let horiz: std::borrow::Cow<[u8]> = if out_w != w {
        let ax = axis(w, out_w, filter);
        let mut out = vec![0u8; out_w * h * 3];
        for y in 0..h {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            for o in 0..out_w {
                let k = &ax.weights[o * ax.ksize..o * ax.ksize + ax.count[o]];
                let mut acc = [half; 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = (ax.first[o] + x) * 3;
                    for c in 0..3 {
                        acc[c] += row[p + c] as i32 * kx;
                    }
                }
                for c in 0..3 {
                    out[(y * out_w + o) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        out.into()
    } else {
        src.into()
    };
    if out_h == h {
        return horiz.into_owned();
    }
    let ax = axis(h, out_h, filter);
    let mut out = vec![0u8; out_w * out_h * 3];
    for o in 0..out_h {
        let k = &ax.weights[o * ax.ksize..o * ax.ksize + ax.count[o]];
        for x in 0..out_w {
            let mut acc = [half; 3];
            for (y, &ky) in k.iter().enumerate() {
                let p = ((ax.first[o] + y) * out_w + x) * 3;
                for c in 0..3 {
                    acc[c] += horiz[p + c] as i32 * ky;
                }
            }
            for c in 0..3 {
                out[(o * out_w + x) * 3 + c] = clip8(acc[c]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(300, 224), (224, 300), (7, 3), (3, 7), (451, 64)] {
            let ax = axis(i, o, Filter::Bicubic);
            for k in 0..o {
                let s: i32 = ax.weights[k * ax.ksize..k * ax.ksize + ax.count[k]]
                    .iter()
                    .sum();
                // Each weight rounds separately: the sum is within one unit per tap of 2^22.
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= ax.ksize as i32,
                    "{i}->{o} row {k}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 37 * 23 * 3];
        for (w, h) in [(16, 9), (80, 50), (37, 10)] {
            let out = resize_rgb8(&src, 37, 23, w, h, Filter::Bicubic);
            assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&src, 5, 4, 5, 4, Filter::Bicubic), src);
    }
}
