//! BatchNorm2d in its training form — each channel normalised with the batch's mean and biased
//! variance over (N, H, W), then scaled and shifted (Ioffe & Szegedy 2015, Alg. 1; PyTorch's
//! `BatchNorm2d` in `train()` mode) — optionally followed by the ReLU that comes after most of
//! the ResNet's norms (open_clip modified_resnet.py `Bottleneck`, the stem).
//!
//! Composed from candle primitives, one BatchNorm is ~10 tensors each way and its per-channel
//! sums run on candle's strided single-thread reduction: that was ~40% of a ResNet CLIP training
//! step on the CPU. [`train`] runs one fused pass each way there (float32, contiguous NCHW),
//! channel sums accumulated in double as PyTorch's CPU kernel does (aten Normalization.cpp
//! `batch_norm_cpu_collect_stats`), each channel's in a fixed order so the result does not depend
//! on the threads; elsewhere (other dtypes, CUDA) the composition runs.

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{f32s, with_f32s};
use super::vecmath;

/// A batch's per-channel statistics: the mean, the biased variance and 1/√(var + ε).
#[derive(Debug)]
struct Stats {
    mean: Vec<f32>,
    var: Vec<f32>,
    invstd: Vec<f32>,
}

/// The normalised output `[N, C, H, W]` and the batch's mean and biased variance `[C]` (not
/// differentiable: for the running statistics).
pub struct Normalised {
    pub y: Tensor,
    pub mean: Tensor,
    pub var: Tensor,
}

/// Training-form BatchNorm of `x` `[N, C, H, W]` with `weight` and `bias` `[C]`, then ReLU when
/// `relu`; differentiable in all three. Fused on the CPU in float32, composed elsewhere.
pub fn train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Normalised> {
    let (n, c, h, w) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "batch_norm: weight {:?} / bias {:?} for {c} channels",
            weight.dims(),
            bias.dims()
        );
    }
    if c == 0 {
        bail!("batch_norm: an input {:?} without channels", x.dims());
    }
    if n * h * w < 2 {
        bail!(
            "BatchNorm in training needs more than one value per channel (batch {n}, feature \
             map {h}x{w}): use a larger batch or image"
        );
    }
    if x.dtype() == DType::F32 && x.device().is_cpu() && weight.dtype() == DType::F32 {
        fused(x, weight, bias, eps, relu)
    } else {
        composed(x, weight, bias, eps, relu)
    }
}

/// The fused op, and the statistics it computed read back into tensors.
fn fused(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, relu: bool) -> Result<Normalised> {
    let stats = Arc::new(OnceLock::new());
    let op = BatchNormOp {
        eps,
        relu,
        stats: stats.clone(),
    };
    let y = x.contiguous()?.apply_op3(weight, bias, op)?;
    let Some(s) = stats.get() else {
        bail!("batch_norm: the forward pass left no statistics");
    };
    let c = s.mean.len();
    Ok(Normalised {
        y,
        mean: Tensor::from_vec(s.mean.clone(), c, x.device())?,
        var: Tensor::from_vec(s.var.clone(), c, x.device())?,
    })
}

/// The same from candle primitives (other devices and dtypes; the tests' reference).
pub fn composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Normalised> {
    let (n, c, h, w) = x.dims4()?;
    let count = (n * h * w) as f64;
    // Sums over (N, H, W): the contiguous H·W first, then N.
    let per_channel = |t: &Tensor| -> Result<Tensor> {
        t.reshape((n, c, h * w))?
            .sum_keepdim(2)?
            .sum_keepdim(0)?
            .reshape((1, c, 1, 1))
    };
    let mean = (per_channel(x)? / count)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = (per_channel(&centered.sqr()?)? / count)?;
    let y = centered.broadcast_div(&(var.clone() + eps)?.sqrt()?)?;
    let y = y
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    let y = if relu { y.relu()? } else { y };
    Ok(Normalised {
        y,
        mean: mean.detach().flatten_all()?,
        var: var.detach().flatten_all()?,
    })
}

/// The op: x, weight, bias → y; computes the batch's statistics in its forward pass and keeps
/// them (for the caller's running statistics and for its own backward pass).
struct BatchNormOp {
    eps: f64,
    relu: bool,
    stats: Arc<OnceLock<Stats>>,
}

/// `[N, C, H·W]` of a 4-d layout.
fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    Ok((n, c, h * w))
}

/// The sum of `f(j)` for `j < n`: in float32 lanes for a plane of 16 values or more, in order
/// below (the lanes' fold would cost more than the sum).
#[inline(always)]
fn plane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    if n >= 16 {
        vecmath::sum_of(n, f)
    } else {
        (0..n).fold(0.0, |a, j| a + f(j))
    }
}

vecmath::multiversion! {
    /// Per channel, over the images of a chunk `[b, c, hw]`: Σ x (`mean` empty) or
    /// Σ (x − mean)², each plane in float32, the planes added in double into `out` (`c`).
    fn chunk_sums(x: &[f32], c: usize, hw: usize, mean: &[f32], out: &mut [f64]) {
        for xi in x.chunks(c * hw) {
            for ch in 0..c {
                let p = &xi[ch * hw..][..hw];
                out[ch] += if mean.is_empty() {
                    plane_sum(hw, |j| p[j]) as f64
                } else {
                    let m = mean[ch];
                    plane_sum(hw, |j| (p[j] - m) * (p[j] - m)) as f64
                };
            }
        }
    }
}

/// Per-channel sums of `x` `[n, c, hw]` ([`chunk_sums`]): a partial per fixed chunk of images,
/// the partials added in chunk order, so the result does not depend on the threads.
fn channel_sums(x: &[f32], c: usize, hw: usize, mean: &[f32]) -> Vec<f64> {
    let chunk = c * hw * vecmath::items_per_task(c * hw);
    let partials: Vec<Vec<f64>> = x
        .par_chunks(chunk)
        .map(|xc| {
            let mut out = vec![0f64; c];
            chunk_sums(xc, c, hw, mean, &mut out);
            out
        })
        .collect();
    vecmath::add_in_order(partials, c)
}

/// The per-channel statistics of `x` `[n, c, hw]`: two passes (the mean, then the squared
/// deviations from it).
fn channel_stats(x: &[f32], (n, c, hw): (usize, usize, usize), eps: f64) -> Stats {
    let count = (n * hw) as f64;
    let mean: Vec<f32> = channel_sums(x, c, hw, &[])
        .iter()
        .map(|s| (s / count) as f32)
        .collect();
    let var: Vec<f64> = channel_sums(x, c, hw, &mean)
        .iter()
        .map(|s| s / count)
        .collect();
    Stats {
        mean,
        var: var.iter().map(|&v| v as f32).collect(),
        invstd: var
            .iter()
            .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
            .collect(),
    }
}

vecmath::multiversion! {
    /// `y = x·α + β` per channel (α = w/σ, β = b − mean·α, as PyTorch's CPU kernel), then
    /// ReLU when `relu` (a NaN stays NaN), over the images of a chunk.
    fn normalise(x: &[f32], y: &mut [f32], hw: usize, ab: (&[f32], &[f32]), relu: bool) {
        let (alpha, beta) = ab;
        let c = alpha.len();
        for (yi, xi) in y.chunks_mut(c * hw).zip(x.chunks(c * hw)) {
            for ch in 0..c {
                let (a, b) = (alpha[ch], beta[ch]);
                let (yp, xp) = (&mut yi[ch * hw..][..hw], &xi[ch * hw..][..hw]);
                for j in 0..hw {
                    let v = xp[j] * a + b;
                    yp[j] = if relu && v < 0.0 { 0.0 } else { v };
                }
            }
        }
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "vlalign-batch-norm"
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
        let x = f32s(s1, l1, "batch_norm")?;
        let (w, b) = (f32s(s2, l2, "batch_norm")?, f32s(s3, l3, "batch_norm")?);
        let (n, c, hw) = dims(l1)?;
        if w.len() != c || b.len() != c {
            bail!(
                "batch_norm: weight {} / bias {} for {c} channels",
                w.len(),
                b.len()
            );
        }
        let stats = channel_stats(x, (n, c, hw), self.eps);
        let alpha: Vec<f32> = (0..c).map(|i| stats.invstd[i] * w[i]).collect();
        let beta: Vec<f32> = (0..c).map(|i| b[i] - stats.mean[i] * alpha[i]).collect();
        let chunk = c * hw * vecmath::items_per_task(c * hw);
        let fill = |y: &mut [f32]| {
            y.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(yc, xc)| normalise(xc, yc, hw, (&alpha, &beta), self.relu))
        };
        // SAFETY: `normalise` writes every element of every image, reading none of y.
        let y = unsafe { super::gemm::filled(x.len(), fill) };
        if self.stats.set(stats).is_err() {
            bail!("batch_norm: the op ran twice");
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            bail!("batch_norm backward: no statistics from the forward pass");
        };
        let dy = dy.contiguous()?;
        if dy.dims() != x.dims() {
            bail!(
                "batch_norm backward: gradient {:?} for {:?}",
                dy.dims(),
                x.dims()
            );
        }
        let (n, c, h, wd) = x.dims4()?;
        let (dx, dw, db) = with_f32s(
            [x, w, y, &dy],
            "batch_norm backward operand",
            |[x, w, y, g]| Ok(backward((x, w, y, g), (n, c, h * wd), stats, self.relu)),
        )?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// dy through the ReLU: 0 where its output was not positive.
#[inline(always)]
fn through_relu(g: f32, y: f32, relu: bool) -> f32 {
    if relu && y <= 0.0 {
        0.0
    } else {
        g
    }
}

/// One plane's Σ g and Σ g·(x − m), g the gradient through the ReLU, in one pass: 16 running
/// lanes each (value j into lane j mod 16), folded as [`vecmath::fold_lanes`] does.
#[inline(always)]
fn plane_grad_sums((x, y, g): (&[f32], &[f32], &[f32]), m: f32, relu: bool) -> (f32, f32) {
    let n = g.len();
    let (x, y) = (&x[..n], &y[..n]);
    let (mut s, mut sx) = ([0f32; 16], [0f32; 16]);
    let whole = n / 16 * 16;
    let mut base = 0;
    while base < whole {
        let (xs, ys, gs) = (
            &x[base..base + 16],
            &y[base..base + 16],
            &g[base..base + 16],
        );
        for l in 0..16 {
            let gj = through_relu(gs[l], ys[l], relu);
            s[l] += gj;
            sx[l] += gj * (xs[l] - m);
        }
        base += 16;
    }
    for (l, j) in (whole..n).enumerate() {
        let gj = through_relu(g[j], y[j], relu);
        s[l] += gj;
        sx[l] += gj * (x[j] - m);
    }
    (vecmath::fold_lanes(s), vecmath::fold_lanes(sx))
}

vecmath::multiversion! {
    /// Per channel, over the images of a chunk `[b, c, hw]`: Σ g and Σ g·(x − mean), g the
    /// gradient through the ReLU, each plane in float32, the planes added in double into `out`
    /// (`2c`: the Σ g first).
    fn chunk_grad_sums(
        xyg: (&[f32], &[f32], &[f32]),
        c: usize,
        hw: usize,
        mean: &[f32],
        relu: bool,
        out: &mut [f64],
    ) {
        let (x, y, g) = xyg;
        let image = c * hw;
        for ((xi, yi), gi) in x.chunks(image).zip(y.chunks(image)).zip(g.chunks(image)) {
            for ch in 0..c {
                let o = ch * hw;
                let (xp, yp, gp) = (&xi[o..][..hw], &yi[o..][..hw], &gi[o..][..hw]);
                let (s, sx) = plane_grad_sums((xp, yp, gp), mean[ch], relu);
                out[ch] += s as f64;
                out[c + ch] += sx as f64;
            }
        }
    }
}

vecmath::multiversion! {
    /// dx = (g − mean(g) − (x − mean)·k)·σ⁻¹·w with k = Σ g·(x − mean)·σ⁻²/M (PyTorch's
    /// `batch_norm_cpu_backward`), over the images of a chunk; `coef` per channel is
    /// (mean(g), k, σ⁻¹·w, mean).
    fn dx_images(
        xyg: (&[f32], &[f32], &[f32]),
        dx: &mut [f32],
        hw: usize,
        coef: &[(f32, f32, f32, f32)],
        relu: bool,
    ) {
        let (x, y, g) = xyg;
        let c = coef.len();
        for (i, d) in dx.chunks_mut(c * hw).enumerate() {
            for (ch, &(gm, k, scale, m)) in coef.iter().enumerate() {
                let o = ch * hw;
                let base = i * c * hw + o;
                let (xp, yp, gp) = (&x[base..][..hw], &y[base..][..hw], &g[base..][..hw]);
                let dp = &mut d[o..][..hw];
                for j in 0..hw {
                    let gj = through_relu(gp[j], yp[j], relu);
                    dp[j] = (gj - gm - (xp[j] - m) * k) * scale;
                }
            }
        }
    }
}

/// The backward pass over contiguous `[N, C, hw]` slices: (dx, dweight, dbias).
fn backward(
    (x, w, y, g): (&[f32], &[f32], &[f32], &[f32]),
    (n, c, hw): (usize, usize, usize),
    stats: &Stats,
    relu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let chunk = c * hw * vecmath::items_per_task(c * hw);
    let partials: Vec<Vec<f64>> = x
        .par_chunks(chunk)
        .zip(y.par_chunks(chunk))
        .zip(g.par_chunks(chunk))
        .map(|((xc, yc), gc)| {
            let mut out = vec![0f64; 2 * c];
            chunk_grad_sums((xc, yc, gc), c, hw, &stats.mean, relu, &mut out);
            out
        })
        .collect();
    let both = vecmath::add_in_order(partials, 2 * c);
    let sums: Vec<(f64, f64)> = (0..c).map(|ch| (both[ch], both[c + ch])).collect();
    let count = (n * hw) as f64;
    let coef: Vec<(f32, f32, f32, f32)> = (0..c)
        .map(|ch| {
            let (s, sx) = sums[ch];
            let inv = stats.invstd[ch] as f64;
            (
                (s / count) as f32,
                (sx * inv * inv / count) as f32,
                stats.invstd[ch] * w[ch],
                stats.mean[ch],
            )
        })
        .collect();
    let dw = (0..c)
        .map(|ch| (sums[ch].1 * stats.invstd[ch] as f64) as f32)
        .collect();
    let db = sums.iter().map(|s| s.0 as f32).collect();
    let per = vecmath::items_per_task(c * hw);
    let fill = |dx: &mut [f32]| {
        dx.par_chunks_mut(c * hw * per)
            .enumerate()
            .for_each(|(t, d)| {
                let o = t * c * hw * per;
                let len = d.len();
                let part = (&x[o..o + len], &y[o..o + len], &g[o..o + len]);
                dx_images(part, d, hw, &coef, relu);
            })
    };
    // SAFETY: `dx_images` writes every element of every image, reading none of dx.
    let dx = unsafe { super::gemm::filled(x.len(), fill) };
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused::rel;
    use crate::nn::host::flat;
    use candle_core::{Device, Var};

    /// Values, statistics and all three gradients of the fused op against candle's
    /// differentiation of the composition, with and without the ReLU, on shapes with one
    /// image, one pixel a channel and many.
    #[test]
    fn fused_matches_the_composition() {
        let dev = Device::Cpu;
        for (shape, relu) in [
            ((4, 3, 5, 7), false),
            ((4, 3, 5, 7), true),
            ((1, 8, 3, 3), true),
            ((16, 5, 1, 1), true),
            ((3, 40, 2, 2), false),
        ] {
            let x =
                Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 0.7).unwrap())
                    .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.4, shape.1, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.4, shape.1, &dev).unwrap()).unwrap();
            let probe = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let run = |f: fn(&Tensor, &Tensor, &Tensor, f64, bool) -> Result<Normalised>| {
                let o = f(&x, &w, &b, 1e-5, relu).unwrap();
                let grads = (&o.y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g = |t: &Tensor| grads.get(t).unwrap().clone();
                (o.y.clone(), o.mean, o.var, g(&x), g(&w), g(&b))
            };
            let fu = run(fused);
            let co = run(composed);
            let diffs = [
                rel(&fu.0, &co.0).unwrap(),
                rel(&fu.1, &co.1).unwrap(),
                rel(&fu.2, &co.2).unwrap(),
                rel(&fu.3, &co.3).unwrap(),
                rel(&fu.4, &co.4).unwrap(),
                rel(&fu.5, &co.5).unwrap(),
            ];
            for (what, d) in ["y", "mean", "var", "dx", "dw", "db"].iter().zip(diffs) {
                assert!(
                    d < 2e-5,
                    "{shape:?} relu {relu}: {what} relative diff {d:e}"
                );
            }
        }
    }

    /// Hand-derived: one channel holding [1, 3] (mean 2, variance 1), weight 2, bias 1, ε 0:
    /// y = [−1, 3]; with the ReLU y = [0, 3]. With upstream gradient [1, 0] and no ReLU,
    /// dbias = 1, dweight = Σ g·x̂ = −1, dx = w/σ·(g − mean g − x̂·mean(g·x̂)) = 2·([1, 0] − 0.5
    /// − [−1, 1]·(−0.5)) = [0, 0]; through the ReLU (first output clipped) g = [0, 0]: all 0.
    #[test]
    fn two_values_by_hand() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::new(&[1f32, 3.0], &dev)
                .unwrap()
                .reshape((2, 1, 1, 1))
                .unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&Tensor::new(&[2f32], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1f32], &dev).unwrap()).unwrap();
        let up = Tensor::new(&[1f32, 0.0], &dev)
            .unwrap()
            .reshape((2, 1, 1, 1))
            .unwrap();
        for relu in [false, true] {
            let o = train(&x, &w, &b, 0.0, relu).unwrap();
            let want: &[f32] = if relu { &[0.0, 3.0] } else { &[-1.0, 3.0] };
            assert_eq!(flat::<f32>(&o.y).unwrap(), want);
            assert_eq!(flat::<f32>(&o.mean).unwrap(), [2.0]);
            assert_eq!(flat::<f32>(&o.var).unwrap(), [1.0]);
            let grads = (&o.y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |t: &Tensor| flat::<f32>(grads.get(t).unwrap()).unwrap();
            assert_eq!(g(&x), [0.0, 0.0]);
            assert_eq!(g(&w), if relu { [0.0] } else { [-1.0] });
            assert_eq!(g(&b), if relu { [0.0] } else { [1.0] });
        }
    }

    /// An input without channels is one error, not a panic.
    #[test]
    fn no_channels_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 0, 2, 2), DType::F32, &dev).unwrap();
        let e = Tensor::zeros(0, DType::F32, &dev).unwrap();
        assert!(train(&x, &e, &e, 1e-5, true).is_err());
    }

    /// A NaN input gives NaN outputs, through the ReLU too (never a silent 0).
    #[test]
    fn a_nan_stays_nan() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1f32, f32::NAN, 2.0, 0.5], &dev)
            .unwrap()
            .reshape((4, 1, 1, 1))
            .unwrap();
        let one = Tensor::new(&[1f32], &dev).unwrap();
        let zero = Tensor::new(&[0f32], &dev).unwrap();
        let o = train(&x, &one, &zero, 1e-5, true).unwrap();
        assert!(flat::<f32>(&o.y).unwrap().iter().all(|v| v.is_nan()));
    }
}
