//! Average pooling over `k`×`k` windows with stride `k` (PyTorch's `nn.AvgPool2d(k)`: no
//! padding, floor mode — trailing rows and columns that fill no window are left out), as one
//! CPU op each way: what the ResNet tower's anti-aliased strides run (open_clip
//! modified_resnet.py `Bottleneck.avgpool`, the stem's). candle 0.11's `avg_pool2d` and its
//! backward (`upsample_nearest2d`, then a scale) run on one thread; here the planes are split
//! over rayon's pool. Elsewhere (other dtypes, CUDA) candle's runs.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{f32s, with_f32s};

/// `x` `[N, C, H, W]` averaged over `k`×`k` windows: `[N, C, H / k, W / k]`; `x` itself for
/// k = 1.
pub fn avg_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    if k == 1 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    if k == 0 || h < k || w < k {
        bail!("avg_pool2d: a {k}x{k} window over a {h}x{w} map");
    }
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        x.contiguous()?.apply_op1(AvgPool { k })
    } else {
        x.avg_pool2d(k)
    }
}

struct AvgPool {
    k: usize,
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "vlalign-avg-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "avg_pool2d")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let k = self.k;
        let (ho, wo) = (h / k, w / k);
        let per = super::vecmath::items_per_task(h * w);
        let scale = 1.0 / (k * k) as f32;
        let fill = |y: &mut [f32]| {
            y.par_chunks_mut(ho * wo * per)
                .zip(x.par_chunks(h * w * per))
                .for_each(|(yc, xc)| {
                    for (yp, xp) in yc.chunks_mut(ho * wo).zip(xc.chunks(h * w)) {
                        for oy in 0..ho {
                            let rows = &xp[oy * k * w..][..k * w];
                            for (ox, out) in yp[oy * wo..][..wo].iter_mut().enumerate() {
                                let mut sum = 0f32;
                                for ky in 0..k {
                                    for kx in 0..k {
                                        sum += rows[ky * w + ox * k + kx];
                                    }
                                }
                                *out = sum * scale;
                            }
                        }
                    }
                })
        };
        // SAFETY: `fill` writes every output element once, reading none.
        let y = unsafe { super::gemm::filled(n * c * ho * wo, fill) };
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = x.dims4()?;
        let k = self.k;
        let (ho, wo) = (h / k, w / k);
        let dy = dy.contiguous()?;
        if dy.dims() != [n, c, ho, wo] {
            bail!(
                "avg_pool2d backward: gradient {:?} for {:?}",
                dy.dims(),
                [n, c, ho, wo]
            );
        }
        let scale = 1.0 / (k * k) as f32;
        let per = super::vecmath::items_per_task(h * w);
        let dx = with_f32s([&dy], "avg_pool2d backward: gradient", |[g]| {
            let mut dx = vec![0f32; n * c * h * w];
            dx.par_chunks_mut(h * w * per)
                .zip(g.par_chunks(ho * wo * per))
                .for_each(|(dc, gc)| {
                    for (dp, gp) in dc.chunks_mut(h * w).zip(gc.chunks(ho * wo)) {
                        for iy in 0..ho * k {
                            let src = &gp[(iy / k) * wo..][..wo];
                            let dst = &mut dp[iy * w..][..wo * k];
                            for (ix, d) in dst.iter_mut().enumerate() {
                                *d = src[ix / k] * scale;
                            }
                        }
                    }
                });
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused::rel;
    use crate::nn::host::flat;
    use candle_core::{Device, Var};

    /// Values and the input gradient against candle's avg_pool2d and its differentiation, on
    /// maps that divide, that leave trailing rows and columns out, and on one of many planes.
    /// candle's backward spreads the gradient by nearest upsampling to the whole map, which is
    /// right only when the windows cover it (elsewhere the left-out rows get gradient and the
    /// rest shifts), so the reference pools the covered part of the map (`narrow`, whose
    /// gradient is 0 outside it, as PyTorch's is).
    #[test]
    fn matches_candles_avg_pool2d() {
        let dev = Device::Cpu;
        for (shape, k) in [
            ((2, 3, 8, 8), 2),
            ((3, 2, 7, 9), 2),
            ((1, 2, 9, 10), 3),
            ((4, 70, 16, 16), 4),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
            let ours = avg_pool2d(&x, k).unwrap();
            let (h, w) = (shape.2 / k * k, shape.3 / k * k);
            let covered = x.narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
            let theirs = covered.avg_pool2d(k).unwrap();
            let probe = Tensor::randn(0f32, 1.0, theirs.dims(), &dev).unwrap();
            let grad = |y: &Tensor| {
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(&x).unwrap().clone()
            };
            assert!(
                rel(&ours, &theirs).unwrap() < 1e-6,
                "{shape:?} k {k}: values"
            );
            assert!(
                rel(&grad(&ours), &grad(&theirs)).unwrap() < 1e-6,
                "{shape:?} k {k}: dx"
            );
        }
    }

    /// By hand: a 3×3 map of 1..9 pooled by 2 keeps the top-left window, (1 + 2 + 4 + 5) / 4 =
    /// 3; its gradient (dy = 1) is 1/4 there and 0 on the left-out last row and column.
    #[test]
    fn floor_mode_by_hand() {
        let dev = Device::Cpu;
        let x = Var::new(
            &[[[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]],
            &dev,
        )
        .unwrap();
        let y = avg_pool2d(&x, 2).unwrap();
        assert_eq!(flat::<f32>(&y).unwrap(), [3.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            flat::<f32>(g.get(&x).unwrap()).unwrap(),
            [0.25, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]
        );
        assert!(avg_pool2d(&x, 4).is_err(), "a window larger than the map");
    }
}
