//! Gradient checkpointing (activation recomputation: Chen et al. 2016, "Training Deep Nets with
//! Sublinear Memory Cost"; `torch.utils.checkpoint`, open_clip's `--grad-checkpointing`): a block
//! keeps only its input and output for the backward pass, not the activations inside it, and
//! runs its forward again during the backward to get them. One more forward per block per step
//! buys a peak memory that no longer grows with the activations of every layer at once.
//!
//! candle has no such mode, but its custom ops allow it: the block's output, computed and then
//! cut from its graph (the inner activations are freed with it), is attached to the block's input
//! and its parameters (packed into one tensor by a differentiable `cat`) by an op whose backward
//! rebuilds the block over fresh variables, runs it, and backpropagates the output's gradient
//! through it. The recomputation is the same computation, so the gradients are the ones the
//! block's own graph would give.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, Var};

/// A block's forward over its input and its parameters (in the order they were given).
pub type Block = Arc<dyn Fn(&Tensor, &[Tensor]) -> Result<Tensor> + Send + Sync>;

/// `block(x, params)`, keeping only `x` and the output for backward when anything needs a
/// gradient; the plain forward otherwise.
pub fn checkpointed(x: &Tensor, params: &[Tensor], block: Block) -> Result<Tensor> {
    if !(x.track_op() || params.iter().any(Tensor::track_op)) {
        return block(x, params);
    }
    let shapes = params.iter().map(|p| p.shape().clone()).collect();
    let flat = params
        .iter()
        .map(Tensor::flatten_all)
        .collect::<Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    // The output without its graph: the block's inner activations are dropped here.
    let y = block(x, params)?.detach();
    x.apply_op3(&packed, &y, Recompute { block, shapes })
}

/// Attaches a block's precomputed output (the third operand) to its input and packed parameters;
/// backward recomputes the block.
struct Recompute {
    block: Block,
    /// The parameters' shapes, in packing order.
    shapes: Vec<Shape>,
}

impl Recompute {
    /// Views of the packed parameters `packed` in their shapes.
    fn unpack(&self, packed: &Tensor) -> Result<Vec<Tensor>> {
        let mut at = 0;
        self.shapes
            .iter()
            .map(|s| {
                let n = s.elem_count();
                let p = packed.narrow(0, at, n)?.reshape(s)?;
                at += n;
                Ok(p)
            })
            .collect()
    }
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "vlalign-checkpoint"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l3.contiguous_offsets() != Some((0, l3.shape().elem_count())) {
            bail!("checkpoint: the block's output must be contiguous from offset 0");
        }
        Ok((s3.clone(), l3.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if l3.contiguous_offsets() != Some((0, l3.shape().elem_count())) {
            bail!("checkpoint: the block's output must be contiguous from offset 0");
        }
        Ok((s3.try_clone(l3)?, l3.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let pv = Var::from_tensor(&packed.detach())?;
        let y = (self.block)(xv.as_tensor(), &self.unpack(pv.as_tensor())?)?;
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        Ok((
            grads.get(xv.as_tensor()).cloned(),
            grads.get(pv.as_tensor()).cloned(),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// A two-parameter block (`tanh(x W) + b`, softmax over the last axis): the checkpointed
    /// output and the gradients of its input and both parameters are the plain graph's, bit for
    /// bit (the same operations run again), and the output keeps no graph of the block's inside.
    #[test]
    fn recomputed_gradients_are_the_graphs() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 5, 8), &dev).unwrap();
        let w = Var::randn(0f32, 0.5, (8, 8), &dev).unwrap();
        let b = Var::randn(0f32, 0.5, 8, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).unwrap();
        let block: Block = Arc::new(|x: &Tensor, p: &[Tensor]| {
            let y = x.broadcast_matmul(&p[0])?.tanh()?.broadcast_add(&p[1])?;
            candle_nn::ops::softmax(&y, D::Minus1)
        });
        let params = [w.as_tensor().clone(), b.as_tensor().clone()];
        let run = |y: Tensor| {
            let g = y
                .mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            let out = bits(&y);
            let grads =
                [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|v| bits(g.get(v).unwrap()));
            (out, grads)
        };
        let plain = run(block(x.as_tensor(), &params).unwrap());
        let ours = run(checkpointed(x.as_tensor(), &params, block.clone()).unwrap());
        assert!(plain == ours);
        // Nothing to differentiate: the plain forward, no op attached.
        let frozen = [w.as_tensor().detach(), b.as_tensor().detach()];
        let y = checkpointed(&x.as_tensor().detach(), &frozen, block).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.dtype(), DType::F32);
    }
}
