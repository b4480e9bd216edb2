//! `relu(a + b)` — a residual block's sum and the ReLU after it (open_clip modified_resnet.py
//! `Bottleneck.forward`: `out += identity; out = self.act3(out)`) — as one CPU op each way,
//! elements split over rayon's pool, where candle runs an add, a ReLU and, backward, a compare,
//! a cast and a product, the ReLU's on one thread. Elsewhere (other dtypes, CUDA) that
//! composition runs.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{f32s, with_f32s};

/// Elements per parallel task.
const CHUNK: usize = super::vecmath::TASK_VALUES;

/// `relu(a + b)` for `a` and `b` of one shape; differentiable in both. A NaN stays NaN.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    if a.dtype() == DType::F32 && b.dtype() == DType::F32 && a.device().is_cpu() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "vlalign-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32s(s1, l1, "add_relu")?, f32s(s2, l2, "add_relu")?);
        let fill = |y: &mut [f32]| {
            y.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(yc, (ac, bc))| {
                    for ((y, a), b) in yc.iter_mut().zip(ac).zip(bc) {
                        let v = a + b;
                        *y = if v < 0.0 { 0.0 } else { v };
                    }
                })
        };
        // SAFETY: `fill`'s tasks write every element, reading none.
        let y = unsafe { super::gemm::filled(a.len(), fill) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let g = with_f32s([y, &dy], "add_relu backward operand", |[y, g]| {
            let fill = |out: &mut [f32]| {
                out.par_chunks_mut(CHUNK)
                    .zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|(oc, (yc, gc))| {
                        for ((o, y), g) in oc.iter_mut().zip(yc).zip(gc) {
                            *o = if *y > 0.0 { *g } else { 0.0 };
                        }
                    })
            };
            // SAFETY: `fill`'s tasks write every element, reading none.
            let out = unsafe { super::gemm::filled(g.len(), fill) };
            Ok(out)
        })?;
        let g = Tensor::from_vec(g, a.shape(), a.device())?;
        Ok((Some(g.clone()), Some(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::host::flat;
    use candle_core::{Device, Var};

    /// By hand: a + b = [−3, 0, 2.5, NaN] → [0, 0, 2.5, NaN]; the gradient (dy = [1, 2, 3, 4])
    /// reaches both inputs where the output is positive: [0, 0, 3, 0].
    #[test]
    fn by_hand() {
        let dev = Device::Cpu;
        let a = Var::new(&[-1f32, 1.0, 2.0, f32::NAN], &dev).unwrap();
        let b = Var::new(&[-2f32, -1.0, 0.5, 1.0], &dev).unwrap();
        let y = add_relu(&a, &b).unwrap();
        let v = flat::<f32>(&y).unwrap();
        assert_eq!(v[..3], [0.0, 0.0, 2.5]);
        assert!(v[3].is_nan());
        let dy = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev).unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward();
        // The NaN makes the sum NaN but not the gradients, which are the mask times dy.
        let g = g.unwrap();
        for t in [&a, &b] {
            assert_eq!(
                flat::<f32>(g.get(t).unwrap()).unwrap(),
                [0.0, 0.0, 3.0, 0.0]
            );
        }
        assert!(add_relu(&a, &Tensor::zeros(3, DType::F32, &dev).unwrap()).is_err());
    }

    /// Against candle's add and ReLU over many chunks (values; gradients away from 0, where
    /// candle's ReLU passes the gradient at exactly 0 and PyTorch's, like ours, does not).
    #[test]
    fn matches_the_composition() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 70_000), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 70_000), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 70_000), &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let f = |t: &Tensor| flat::<f32>(g.get(t).unwrap()).unwrap();
            (flat::<f32>(&y).unwrap(), f(&a), f(&b))
        };
        let ours = run(add_relu(&a, &b).unwrap());
        let theirs = run((&*a + &*b).unwrap().relu().unwrap());
        assert_eq!(ours, theirs);
    }
}
