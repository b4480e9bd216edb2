//! 2-D convolution (NCHW, one group, no bias, dilation 1) as one CPU graph node each way, the
//! way PyTorch's CPU `slow_conv2d` computes it: the input's patches unfolded into a
//! `[Cin·kh·kw, Ho·Wo]` matrix per image ("im2col") and one product with the `[Cout, Cin·kh·kw]`
//! weight per chunk of images;
//! backward, `dW = Σ dy·colsᵀ` and `dx = col2im(Wᵀ·dy)`.
//!
//! candle 0.11 differentiates its conv2d through a second conv2d for the weight gradient — the
//! batch as channels and the whole output map as the kernel, unfolded by single-threaded loops —
//! and `conv_transpose2d` (dot products) for the input's: ~60% of a ResNet CLIP training step on
//! the CPU after the fused BatchNorm. [`conv2d`] runs this module's op there (float32), candle's
//! conv2d elsewhere. The images go in chunks (one image for large maps, several side by side as
//! columns of one product for small ones), the chunks split over rayon's pool; the weight
//! gradient is summed per chunk and the chunks added in order, so the result does not depend
//! on the threads. The input's gradient is formed only when the input needs one
//! (not for the pixels under the stem).

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{f32s, with_f32s};
use super::gemm;

/// `x` `[N, Cin, H, W]` convolved with `w` `[Cout, Cin, kh, kw]`, zero `padding` on every side,
/// `stride` in both directions: `[N, Cout, Ho, Wo]`, Ho = (H + 2·padding − kh) / stride + 1.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() {
        let geo = Geometry::of(x.dims(), w.dims(), padding, stride)?;
        x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dOp(geo))
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    padding: usize,
    stride: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn of(x: &[usize], w: &[usize], padding: usize, stride: usize) -> Result<Self> {
        let (&[n, cin, h, wd], &[cout, wcin, kh, kw]) = (x, w) else {
            bail!("conv2d: input {x:?} and weight {w:?} must both be 4-d");
        };
        if [n, cin, h, wd, cout].contains(&0) {
            bail!("conv2d: input {x:?} and weight {w:?} must have no empty dimension");
        }
        if wcin != cin {
            bail!("conv2d: weight {w:?} for an input of {cin} channels");
        }
        if stride == 0 || kh == 0 || kw == 0 {
            bail!("conv2d: stride {stride} and kernel {kh}x{kw} must be positive");
        }
        if h + 2 * padding < kh || wd + 2 * padding < kw {
            bail!("conv2d: kernel {kh}x{kw} larger than the padded {h}x{wd} input");
        }
        Ok(Self {
            n,
            cin,
            h,
            w: wd,
            cout,
            kh,
            kw,
            padding,
            stride,
            ho: (h + 2 * padding - kh) / stride + 1,
            wo: (wd + 2 * padding - kw) / stride + 1,
        })
    }

    /// Rows of the unfolded matrix (the weight's row length).
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Output pixels per map.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1×1 kernel, stride 1, no padding: the image is its own unfolded matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// The output columns `[lo, hi)` whose input column `ox·stride + kj − padding` lies inside.
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // ox·s + kj ≥ p and ox·s + kj − p < w.
        let lo = p.saturating_sub(kj).div_ceil(s);
        let hi = if self.w + p > kj {
            ((self.w + p - kj).div_ceil(s)).min(self.wo)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// Calls `f(ci, row, oy, iy, ix0, lo, hi)` for every unfolded row and output row whose input
    /// row is inside: unfolded row `row` (of channel `ci`) at output row `oy` reads input row
    /// `iy` of channel `ci` at columns `ix0 + o·stride` for output columns `lo + o` < `hi`.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize, usize, usize, usize)) {
        for ci in 0..self.cin {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = (ci * self.kh + ki) * self.kw + kj;
                    let (lo, hi) = self.valid_cols(kj);
                    for oy in 0..self.ho {
                        let iy = oy * self.stride + ki;
                        if iy < self.padding || iy - self.padding >= self.h || lo >= hi {
                            continue;
                        }
                        let ix0 = lo * self.stride + kj - self.padding;
                        f(ci, row, oy, iy - self.padding, ix0, lo, hi);
                    }
                }
            }
        }
    }

    /// Unfolds one image `[Cin, H, W]` into its `P` columns of `cols` (`K` rows of `stride`
    /// values; zeros where a patch reads padding).
    fn im2col(&self, img: &[f32], cols: &mut [f32], stride: usize) {
        let (p, s) = (self.p(), self.stride);
        if self.pointwise() {
            for (row, src) in img.chunks(p).enumerate() {
                cols[row * stride..][..p].copy_from_slice(src);
            }
            return;
        }
        for row in 0..self.k() {
            cols[row * stride..][..p].fill(0.0);
        }
        self.for_each_run(|ci, row, oy, iy, ix0, lo, hi| {
            let src = &img[(ci * self.h + iy) * self.w..][..self.w];
            let dst = &mut cols[row * stride + oy * self.wo..][lo..hi];
            if s == 1 {
                dst.copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
            } else {
                for (o, d) in dst.iter_mut().enumerate() {
                    *d = src[ix0 + o * s];
                }
            }
        });
    }

    /// Adds one image's `P` columns of the unfolded gradient `cols` (`K` rows of `stride`
    /// values) back into its gradient `[Cin, H, W]`.
    fn col2im(&self, cols: &[f32], stride: usize, img: &mut [f32]) {
        let (p, s) = (self.p(), self.stride);
        if self.pointwise() {
            for (row, dst) in img.chunks_mut(p).enumerate() {
                dst.copy_from_slice(&cols[row * stride..][..p]);
            }
            return;
        }
        img.fill(0.0);
        self.for_each_run(|ci, row, oy, iy, ix0, lo, hi| {
            let dst = &mut img[(ci * self.h + iy) * self.w..][..self.w];
            let src = &cols[row * stride + oy * self.wo..][lo..hi];
            for (o, v) in src.iter().enumerate() {
                dst[ix0 + o * s] += v;
            }
        });
    }

    /// Images a product covers: enough that it has ~256 columns (a map of 2×2 pixels would make
    /// a product too thin for the gemm kernels), one for larger maps. A function of the shape
    /// only, so the weight gradient's association does not depend on the threads.
    fn images_per_chunk(&self) -> usize {
        256usize.div_ceil(self.p()).clamp(1, self.n.max(1))
    }

    /// Threads each product may use: all when there are fewer chunks than threads.
    fn product_threads(&self) -> usize {
        let threads = rayon::current_num_threads();
        if self.n.div_ceil(self.images_per_chunk()) < threads {
            threads
        } else {
            1
        }
    }
}

/// The op: x, weight → y.
struct Conv2dOp(Geometry);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "vlalign-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (x, w) = (f32s(s1, l1, "conv2d")?, f32s(s2, l2, "conv2d")?);
        if x.len() != g.n * g.cin * g.h * g.w || w.len() != g.cout * g.k() {
            bail!("conv2d: input or weight size changed since the op was built");
        }
        let (k, p, b) = (g.k(), g.p(), g.images_per_chunk());
        let threads = g.product_threads();
        let fill = |y: &mut [f32]| {
            y.par_chunks_mut(b * g.cout * p)
                .zip(x.par_chunks(b * g.cin * g.h * g.w))
                .for_each(|(yc, xc)| {
                    let images = yc.len() / (g.cout * p);
                    let cols = unfold(&g, xc, images);
                    let mut out = Scratch::take(g.cout * images * p);
                    // SAFETY: out [Cout×BP], W [Cout×K] and cols [K×BP] are whole, row-major slices
                    // of those sizes; out is this task's own.
                    unsafe {
                        gemm::product(
                            (g.cout, images * p, k),
                            out.as_mut_ptr(),
                            (images * p, 1),
                            w.as_ptr(),
                            (k, 1),
                            cols.as_ptr(),
                            (images * p, 1),
                            false,
                            threads,
                        )
                    }
                    // [Cout, B, P] → [B, Cout, P].
                    for (i, yi) in yc.chunks_mut(g.cout * p).enumerate() {
                        for (co, dst) in yi.chunks_mut(p).enumerate() {
                            dst.copy_from_slice(&out[(co * images + i) * p..][..p]);
                        }
                    }
                })
        };
        // SAFETY: every chunk's scatter writes all of its part of y, reading none.
        let y = unsafe { gemm::filled(g.n * g.cout * p, fill) };
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let dy = dy.contiguous()?;
        if dy.dims() != [g.n, g.cout, g.ho, g.wo] {
            bail!(
                "conv2d backward: gradient {:?} for output {:?}",
                dy.dims(),
                [g.n, g.cout, g.ho, g.wo]
            );
        }
        let want_dx = x.track_op();
        let (dx, dw) = with_f32s([x, w, &dy], "conv2d backward operand", |[x, w, dy]| {
            let dw = weight_grad(&g, x, dy);
            let dx = want_dx.then(|| input_grad(&g, w, dy));
            Ok((dx, dw))
        })?;
        let dev = x.device();
        Ok((
            dx.map(|d| Tensor::from_vec(d, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

/// A work buffer of at least `len` values, reused from this thread's earlier ones: its
/// contents are stale, and every user writes what it reads (the products overwrite theirs).
/// Taken out of the pool while in use, so a task that runs nested on the same thread (a
/// product's own rayon split) simply gets another.
struct Scratch(Vec<f32>);

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers a thread keeps for reuse.
const POOL_SIZE: usize = 4;

impl Scratch {
    fn take(len: usize) -> Self {
        let found = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let i = p.iter().position(|v| v.len() >= len)?;
            Some(p.swap_remove(i))
        });
        Self(found.unwrap_or_else(|| vec![0f32; len]))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_SIZE {
                p.push(v);
            } else if let Some(small) = p.iter_mut().min_by_key(|b| b.len()) {
                if small.len() < v.len() {
                    *small = v;
                }
            }
        });
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

/// The unfolded matrix `[K, B·P]` of the `images` images of `xc`: image `i` in columns
/// `i·P .. (i + 1)·P`.
fn unfold(g: &Geometry, xc: &[f32], images: usize) -> Scratch {
    let stride = images * g.p();
    let mut cols = Scratch::take(g.k() * stride);
    for (i, xi) in xc.chunks(g.cin * g.h * g.w).enumerate() {
        g.im2col(xi, &mut cols[i * g.p()..], stride);
    }
    cols
}

/// The gradients `dy` of the `images` images of a chunk as one `[Cout, B·P]` matrix.
fn gather_dy(g: &Geometry, dyc: &[f32], images: usize) -> Scratch {
    let p = g.p();
    let mut m = Scratch::take(g.cout * images * p);
    for (i, dyi) in dyc.chunks(g.cout * p).enumerate() {
        for (co, src) in dyi.chunks(p).enumerate() {
            m[(co * images + i) * p..][..p].copy_from_slice(src);
        }
    }
    m
}

/// `dW [Cout, K] = Σ dy_c [Cout, B·P] · cols_cᵀ [B·P, K]` over the chunks c of images: a
/// partial sum per chunk, the partials added in chunk order.
fn weight_grad(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, p, b) = (g.k(), g.p(), g.images_per_chunk());
    let threads = g.product_threads();
    let partials: Vec<Vec<f32>> = x
        .par_chunks(b * g.cin * g.h * g.w)
        .zip(dy.par_chunks(b * g.cout * p))
        .map(|(xc, dyc)| {
            let images = dyc.len() / (g.cout * p);
            let cols = unfold(g, xc, images);
            let dym = gather_dy(g, dyc, images);
            let mut dw = vec![0f32; g.cout * k];
            // SAFETY: dw [Cout×K] is this task's own; dym [Cout×BP] row-major; colsᵀ [BP×K]
            // reads cols [K×BP] with strides (1, BP).
            unsafe {
                gemm::product(
                    (g.cout, k, images * p),
                    dw.as_mut_ptr(),
                    (k, 1),
                    dym.as_ptr(),
                    (images * p, 1),
                    cols.as_ptr(),
                    (1, images * p),
                    false,
                    threads,
                )
            }
            dw
        })
        .collect();
    super::vecmath::add_in_order(partials, g.cout * k)
}

/// `dx = col2im(Wᵀ [K, Cout] · dy_c [Cout, B·P])` per chunk of images.
fn input_grad(g: &Geometry, w: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, p, b) = (g.k(), g.p(), g.images_per_chunk());
    let threads = g.product_threads();
    let image = g.cin * g.h * g.w;
    let fill = |dx: &mut [f32]| {
        dx.par_chunks_mut(b * image)
            .zip(dy.par_chunks(b * g.cout * p))
            .for_each(|(dxc, dyc)| {
                let images = dyc.len() / (g.cout * p);
                let dym = gather_dy(g, dyc, images);
                let mut dcols = Scratch::take(k * images * p);
                // SAFETY: dcols [K×BP] is this task's own; Wᵀ reads W [Cout×K] with strides (1, K);
                // dym [Cout×BP] row-major.
                unsafe {
                    gemm::product(
                        (k, images * p, g.cout),
                        dcols.as_mut_ptr(),
                        (images * p, 1),
                        w.as_ptr(),
                        (1, k),
                        dym.as_ptr(),
                        (images * p, 1),
                        false,
                        threads,
                    )
                }
                for (i, dxi) in dxc.chunks_mut(image).enumerate() {
                    g.col2im(&dcols[i * p..], images * p, dxi);
                }
            })
    };
    // SAFETY: col2im writes every element of each image's gradient before it reads any (a
    // copy for a pointwise kernel, else zeros, then the sums).
    unsafe { gemm::filled(g.n * image, fill) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused::rel;
    use crate::nn::host::flat;
    use candle_core::{Device, Var};

    /// Output and both gradients against candle's conv2d and its differentiation (a second
    /// conv2d and conv_transpose2d), over the ResNet's kinds — 3×3 padded, the stem's stride 2,
    /// 1×1 — and odd ones: a 5×3 kernel, stride 3 with padding 2, more images than a partial
    /// sum covers, a kernel as large as the padded input. (candle's own backward fails on a
    /// non-square input at stride > 1 — its output padding is taken from the height — so the
    /// strided odd case is square here; the next test covers the other.)
    #[test]
    fn matches_candles_conv2d_and_its_gradients() {
        let dev = Device::Cpu;
        for (x_shape, w_shape, padding, stride) in [
            ((3, 4, 9, 9), (5, 4, 3, 3), 1, 1),
            ((2, 3, 16, 16), (4, 3, 3, 3), 1, 2),
            ((3, 6, 5, 5), (7, 6, 1, 1), 0, 1),
            ((2, 6, 6, 4), (3, 6, 1, 1), 0, 2),
            ((2, 2, 7, 6), (3, 2, 5, 3), 1, 1),
            ((2, 2, 11, 11), (3, 2, 3, 3), 2, 3),
            ((19, 3, 4, 4), (2, 3, 3, 3), 1, 1),
            ((2, 1, 3, 3), (2, 1, 5, 5), 1, 1),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, x_shape, &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, w_shape, &dev).unwrap()).unwrap();
            let ours = conv2d(&x, &w, padding, stride).unwrap();
            let theirs = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            let probe = Tensor::randn(0f32, 1.0, theirs.dims(), &dev).unwrap();
            let grads = |y: &Tensor| {
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (g.get(&x).unwrap().clone(), g.get(&w).unwrap().clone())
            };
            let (gx, gw) = grads(&ours);
            let (hx, hw) = grads(&theirs);
            let case = format!("{x_shape:?} * {w_shape:?} pad {padding} stride {stride}");
            for (what, d) in [
                ("y", rel(&ours, &theirs).unwrap()),
                ("dx", rel(&gx, &hx).unwrap()),
                ("dw", rel(&gw, &hw).unwrap()),
            ] {
                assert!(d < 1e-5, "{case}: {what} relative diff {d:e}");
            }
        }
    }

    /// A non-square input at stride 2 with padding, where candle's own backward cannot serve as
    /// the reference: L = Σ probe·conv(x, w) is linear in each of x and w, so its central
    /// differences are its exact partial derivatives (up to float32 rounding).
    #[test]
    fn non_square_strided_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 2, 7, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (3, 2, 3, 3), &dev).unwrap()).unwrap();
        let y = conv2d(&x, &w, 1, 2).unwrap();
        assert_eq!(y.dims(), [2, 3, 4, 3]);
        let probe = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
        let loss = |x: &Tensor, w: &Tensor| -> f64 {
            let l = (conv2d(x, w, 1, 2).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap();
            f64::from(flat::<f32>(&l).unwrap()[0])
        };
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (var, other, is_x) in [(&x, &w, true), (&w, &x, false)] {
            let grad = flat::<f32>(g.get(var).unwrap()).unwrap();
            let base = flat::<f32>(var).unwrap();
            let h = 0.25f32;
            for i in (0..base.len()).step_by(3) {
                let at = |d: f32| {
                    let mut v = base.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, var.dims(), &dev).unwrap();
                    if is_x {
                        loss(&t, other)
                    } else {
                        loss(other, &t)
                    }
                };
                let fd = (at(h) - at(-h)) / (2.0 * f64::from(h));
                let d = (fd - f64::from(grad[i])).abs();
                assert!(
                    d < 1e-3,
                    "{} [{i}]: finite difference {fd}, gradient {}",
                    if is_x { "dx" } else { "dw" },
                    grad[i]
                );
            }
        }
    }

    /// By hand: a 1×1×3×3 image of 1..9 with a 2×2 kernel of ones (no padding, stride 1) sums
    /// each 2×2 window: [[12, 16], [24, 28]]. With dy all ones, dW = the sum of each window's
    /// pixels over the four placements, [[12, 16], [24, 28]] again, and dx counts the windows
    /// covering each pixel: [[1, 2, 1], [2, 4, 2], [1, 2, 1]].
    #[test]
    fn a_window_sum_by_hand() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(1f32, 10.0, &dev)
                .unwrap()
                .reshape((1, 1, 3, 3))
                .unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&Tensor::ones((1, 1, 2, 2), DType::F32, &dev).unwrap()).unwrap();
        let y = conv2d(&x, &w, 0, 1).unwrap();
        assert_eq!(flat::<f32>(&y).unwrap(), [12.0, 16.0, 24.0, 28.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            flat::<f32>(g.get(&w).unwrap()).unwrap(),
            [12.0, 16.0, 24.0, 28.0]
        );
        assert_eq!(
            flat::<f32>(g.get(&x).unwrap()).unwrap(),
            [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0]
        );
    }

    /// An input that needs no gradient (the pixels) gets none, and the weight's is unchanged.
    #[test]
    fn no_input_gradient_for_a_plain_input() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (4, 3, 3, 3), &dev).unwrap()).unwrap();
        let g = conv2d(&x, &w, 1, 2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none());
        let h = x
            .conv2d(&w, 1, 2, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(rel(g.get(&w).unwrap(), h.get(&w).unwrap()).unwrap() < 1e-5);
    }

    /// Wrong shapes are one error, not a panic.
    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        for (w, pad) in [
            (&[2, 4, 3, 3][..], 1),
            (&[2, 3, 7, 7], 1),
            (&[2, 3, 3], 0),
            (&[0, 3, 3, 3], 1),
        ] {
            let w = Tensor::zeros(w, DType::F32, &dev).unwrap();
            assert!(conv2d(&x, &w, pad, 1).is_err());
        }
    }
}
