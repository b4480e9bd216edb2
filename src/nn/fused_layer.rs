//! One pre-LN transformer layer, `x + attn(ln1(x))` then `+ mlp(ln2(·))` (transformers'
//! `CLIPEncoderLayer`, modeling_clip.py), as one CPU op forward and one backward.
//!
//! Built from the fused ops one by one, the layer is a dozen graph nodes, and candle's backward
//! gives each node's input a fresh zero tensor to add its gradient into (backprop.rs
//! `or_insert`): about twenty activation-sized zero-fills and additions per layer, and the
//! residual sums as tensors of their own (~12% of a clip-tiny train step in `perf`). Here the
//! layer is one node with two inputs, `x` and its parameters packed into one vector (a `cat`,
//! so each parameter still gets its own gradient through candle), and the backward walks the
//! layer itself: each gradient is formed once, the residual adds ride in the products (the
//! out-projection and fc2 start from `x + b`), nothing is zero-filled that is then overwritten.
//! The forward keeps what the backward reads (the LayerNorm outputs, q|k|v, the attention
//! output, the mid-layer residual, fc1's output before and after the activation), as PyTorch's
//! autograd keeps them.
//!
//! The kernels are the fused ops' (`fused`, `fused_linear`, `fused_attention`), so the layer
//! computes what their composition computes up to the order of a few additions;
//! `the_fused_layer_matches_the_composition` holds it to a composition of candle primitives.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{
    activation_backward, activation_forward, column_sum, layer_norm_dx, layer_norm_forward,
    rows_plus, with_f32s, Act,
};
use super::fused_attention::PackedSlices;
use super::fused_linear::Dims;
use super::fused_linear::{forward as linear_forward, input_grad, product_into, weight_grad_to};

/// The parameters of one layer as HF names them (`layer_norm1`, `self_attn.{q,k,v,out}_proj`,
/// `layer_norm2`, `mlp.fc1`, `mlp.fc2`): (weight, bias) pairs, linear weights `[out, in]`.
pub struct LayerParams<'a> {
    pub layer_norm1: (&'a Tensor, &'a Tensor),
    pub q_proj: (&'a Tensor, &'a Tensor),
    pub k_proj: (&'a Tensor, &'a Tensor),
    pub v_proj: (&'a Tensor, &'a Tensor),
    pub out_proj: (&'a Tensor, &'a Tensor),
    pub layer_norm2: (&'a Tensor, &'a Tensor),
    pub fc1: (&'a Tensor, &'a Tensor),
    pub fc2: (&'a Tensor, &'a Tensor),
}

/// Number of parts of the packed parameter vector.
const PARTS: usize = 12;

/// Lengths of the packed vector's parts for width `d` and MLP width `i`, in order: ln1 weight,
/// ln1 bias, W_qkv `[3d, d]` (q, k, v weights stacked), b_qkv, W_o `[d, d]`, b_o, ln2 weight,
/// ln2 bias, W_1 `[i, d]`, b_1, W_2 `[d, i]`, b_2.
fn part_lens(d: usize, i: usize) -> [usize; PARTS] {
    [d, d, 3 * d * d, 3 * d, d * d, d, d, d, i * d, i, d * i, d]
}

/// A packed vector cut into parts of the given lengths.
pub(super) fn split<const N: usize>(p: &[f32], lens: [usize; N]) -> [&[f32]; N] {
    let mut rest = p;
    lens.map(|n| {
        let (head, tail) = rest.split_at(n);
        rest = tail;
        head
    })
}

/// A packed gradient cut into parts of the given lengths.
pub(super) fn split_mut<const N: usize>(p: &mut [f32], lens: [usize; N]) -> [&mut [f32]; N] {
    let mut rest = p;
    lens.map(|n| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        head
    })
}

/// The tensors flattened and concatenated in order, after checking each one's shape (`what`
/// names the block in the error).
pub(super) fn pack(what: &str, want: &[(&str, &Tensor, &[usize])]) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(want.len());
    for &(name, t, shape) in want {
        if t.dims() != shape {
            bail!("{what}: {name} is {:?}, expected {shape:?}", t.dims());
        }
        parts.push(t.flatten_all()?);
    }
    Tensor::cat(&parts, 0)
}

/// The saved activations of a forward, for its backward (an error if the forward never ran or
/// a panic poisoned them).
pub(super) fn saved<T>(slot: &Mutex<Option<T>>) -> Result<std::sync::MutexGuard<'_, Option<T>>> {
    match slot.lock() {
        Ok(g) if g.is_some() => Ok(g),
        Ok(_) => bail!("a fused block's backward ran before its forward"),
        Err(_) => bail!("a fused block's saved activations were poisoned by a panic"),
    }
}

/// Keeps a forward's activations for the backward.
pub(super) fn keep<T>(slot: &Mutex<Option<T>>, value: T) -> Result<()> {
    match slot.lock() {
        Ok(mut g) => {
            *g = Some(value);
            Ok(())
        }
        Err(_) => bail!("a fused block's saved activations were poisoned by a panic"),
    }
}

/// `acc += x`, element-wise.
pub(super) fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(16 * 1024)
        .zip(x.par_chunks(16 * 1024))
        .for_each(|(a, v)| a.iter_mut().zip(v).for_each(|(a, v)| *a += v));
}

/// The MLP `res + fc2(act(fc1(x)))` (`w`: W1 `[i, d]`, b1, W2 `[d, i]`, b2; `res` the residual
/// it adds to, `[rows, d]`): fc1's output `u`, `a = act(u)` and the result, whose starting
/// value is `res + b2` so that the residual rides in fc2's product.
pub(super) fn mlp_forward(
    x: &[f32],
    res: &[f32],
    [w1, b1, w2, b2]: [&[f32]; 4],
    act: Act,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, i) = (b2.len(), b1.len());
    let rows = x.len() / d;
    let u = linear_forward(Dims { rows, k: d, n: i }, x, w1, Some(b1));
    let a = activation_forward(act, &u);
    let out = product_into(
        (rows, d, i),
        Some(rows_plus(res, b2)),
        (&a, (i, 1)),
        (w2, (1, i)),
    );
    (u, a, out)
}

/// An MLP's forward, as its backward reads it: the input `x`, `u` and `a` of
/// [`mlp_forward`], the weights W1 and W2.
pub(super) struct Mlp<'a> {
    pub(super) x: &'a [f32],
    pub(super) u: &'a [f32],
    pub(super) a: &'a [f32],
    pub(super) w: [&'a [f32]; 2],
    pub(super) act: Act,
}

impl Mlp<'_> {
    /// For the output gradient `g`: writes dW1, db1, dW2, db2 and returns the gradient of `x`,
    /// added to `init` when given (in the product: a residual's gradient).
    pub(super) fn backward(
        &self,
        g: &[f32],
        [dw1, db1, dw2, db2]: [&mut [f32]; 4],
        init: Option<Vec<f32>>,
    ) -> Vec<f32> {
        let [w1, w2] = self.w;
        let (d, i) = (db2.len(), db1.len());
        let rows = g.len() / d;
        let fc2 = Dims { rows, k: i, n: d };
        db2.copy_from_slice(&column_sum(g, d));
        weight_grad_to(fc2, g, self.a, dw2);
        let da = input_grad(fc2, g, w2);
        let du = activation_backward(self.act, self.u, &da);
        drop(da);
        let fc1 = Dims { rows, k: d, n: i };
        db1.copy_from_slice(&column_sum(&du, i));
        weight_grad_to(fc1, &du, self.x, dw1);
        product_into((rows, d, i), init, (&du, (i, 1)), (w1, (d, 1)))
    }
}

/// What the forward keeps for the backward (each `[rows, ·]`, row-major).
struct Saved {
    /// ln1(x), the projections' input.
    xn1: Vec<f32>,
    /// q | k | v side by side, `[rows, 3d]`.
    qkv: Vec<f32>,
    /// The attention output (heads merged), the out-projection's input.
    attn: Vec<f32>,
    /// x + out_proj(attn): the residual stream between the two halves.
    x1: Vec<f32>,
    /// ln2(x1), fc1's input.
    xn2: Vec<f32>,
    /// fc1's output before the activation.
    u: Vec<f32>,
    /// act(u), fc2's input.
    a: Vec<f32>,
}

struct LayerOp {
    d: usize,
    i: usize,
    act: Act,
    eps: f32,
    attention: PackedSlices,
}

impl Block for LayerOp {
    type Saved = Saved;
    const NAME: &'static str = "vlalign-encoder-layer";

    fn forward(&self, x: &[f32], p: &[f32]) -> (Vec<f32>, Saved) {
        let (d, i, eps) = (self.d, self.i, self.eps);
        let [ln1w, ln1b, wqkv, bqkv, wo, bo, ln2w, ln2b, w1, b1, w2, b2] =
            split(p, part_lens(d, i));
        let rows = x.len() / d;
        let xn1 = layer_norm_forward(x, ln1w, ln1b, d, eps);
        let qkv = linear_forward(
            Dims {
                rows,
                k: d,
                n: 3 * d,
            },
            &xn1,
            wqkv,
            Some(bqkv),
        );
        let attn = self.attention.forward(&qkv);
        let x1 = product_into(
            (rows, d, d),
            Some(rows_plus(x, bo)),
            (&attn, (d, 1)),
            (wo, (1, d)),
        );
        let xn2 = layer_norm_forward(&x1, ln2w, ln2b, d, eps);
        let (u, a, out) = mlp_forward(&xn2, &x1, [w1, b1, w2, b2], self.act);
        let saved = Saved {
            xn1,
            qkv,
            attn,
            x1,
            xn2,
            u,
            a,
        };
        (out, saved)
    }

    /// dx and the packed parameters' gradient for the output gradient `g`.
    fn backward(&self, s: &Saved, x: &[f32], p: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (d, i, eps) = (self.d, self.i, self.eps);
        let [ln1w, _, wqkv, _, wo, _, ln2w, _, w1, _, w2, _] = split(p, part_lens(d, i));
        let rows = x.len() / d;
        let mut dp = vec![0f32; p.len()];
        let [dln1w, dln1b, dwqkv, dbqkv, dwo, dbo, dln2w, dln2b, dw1, db1, dw2, db2] =
            split_mut(&mut dp, part_lens(d, i));
        let mlp = Mlp {
            x: &s.xn2,
            u: &s.u,
            a: &s.a,
            w: [w1, w2],
            act: self.act,
        };
        let dxn2 = mlp.backward(g, [dw1, db1, dw2, db2], None);
        // ln2, plus the residual path around the MLP.
        let mut dx1 = layer_norm_dx((&s.x1, ln2w, &dxn2), eps, (dln2w, dln2b));
        drop(dxn2);
        add_into(&mut dx1, g);
        // The out-projection: x1 = x + attn Woᵀ + bo.
        let proj = Dims { rows, k: d, n: d };
        dbo.copy_from_slice(&column_sum(&dx1, d));
        weight_grad_to(proj, &dx1, &s.attn, dwo);
        let dattn = input_grad(proj, &dx1, wo);
        // Attention, then the stacked q/k/v projection: qkv = xn1 W_qkvᵀ + b_qkv.
        let dqkv = self.attention.backward(&s.qkv, &dattn);
        drop(dattn);
        let qkv = Dims {
            rows,
            k: d,
            n: 3 * d,
        };
        dbqkv.copy_from_slice(&column_sum(&dqkv, 3 * d));
        weight_grad_to(qkv, &dqkv, &s.xn1, dwqkv);
        let dxn1 = input_grad(qkv, &dqkv, wqkv);
        drop(dqkv);
        // ln1, plus the residual path around attention.
        let mut dx = layer_norm_dx((x, ln1w, &dxn1), eps, (dln1w, dln1b));
        add_into(&mut dx, &dx1);
        (dx, dp)
    }
}

/// A fused block over `x` and its parameters packed into one vector, whose forward keeps
/// activations for its backward: the CLIP layer here, BERT's post-LN blocks in
/// `fused_post_ln`. [`apply`] makes it one graph node.
pub(super) trait Block: Send + Sync + 'static {
    /// What the forward keeps for the backward.
    type Saved: Send + Sync + 'static;
    /// The op's name in candle's graph.
    const NAME: &'static str;
    /// The output (shaped as `x`) and what the backward will read.
    fn forward(&self, x: &[f32], p: &[f32]) -> (Vec<f32>, Self::Saved);
    /// dx and the packed parameters' gradient for the output gradient `g`.
    fn backward(&self, s: &Self::Saved, x: &[f32], p: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>);
}

/// A [`Block`] as a candle op, with the slot its forward's activations wait in.
struct BlockOp<B: Block> {
    block: B,
    saved: Mutex<Option<B::Saved>>,
}

impl<B: Block> CustomOp2 for BlockOp<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::fused::f32s(s1, l1, "fused block input")?;
        let p = super::fused::f32s(s2, l2, "fused block parameters")?;
        let (out, s) = self.block.forward(x, p);
        keep(&self.saved, s)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        if dout.dims() != x.dims() {
            bail!(
                "{} backward: gradient {:?} for output {:?}",
                B::NAME,
                dout.dims(),
                x.dims()
            );
        }
        let slot = saved(&self.saved)?;
        let s = slot.as_ref().expect("checked by saved()");
        let (dx, dp) = with_f32s([x, p, &dout], "fused block backward operand", |[x, p, g]| {
            Ok(self.block.backward(s, x, p, g))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dp, p.shape(), dev)?),
        ))
    }
}

/// `block` over `x` (made contiguous) and its packed parameters, as one graph node.
pub(super) fn apply<B: Block>(x: &Tensor, packed: &Tensor, block: B) -> Result<Tensor> {
    let op = BlockOp {
        block,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(packed, op)
}

/// One pre-LN encoder layer over `x` `[B, T, d]`: `x1 = x + out_proj(attn(ln1(x)))`, then
/// `x1 + fc2(act(fc1(ln2(x1))))`, with `heads` heads, the additive `mask` (as
/// [`super::fused_attention::attention`]'s), LayerNorm epsilon `eps`. Differentiable in `x` and
/// every parameter; checks every parameter's shape against `d` and fc1's width.
pub fn encoder_layer(
    x: &Tensor,
    w: &LayerParams,
    heads: usize,
    act: Act,
    eps: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let i = w.fc1.0.dims().first().copied().unwrap_or(0);
    let want: [(&str, &Tensor, &[usize]); 16] = [
        ("layer_norm1.weight", w.layer_norm1.0, &[d]),
        ("layer_norm1.bias", w.layer_norm1.1, &[d]),
        ("q_proj.weight", w.q_proj.0, &[d, d]),
        ("k_proj.weight", w.k_proj.0, &[d, d]),
        ("v_proj.weight", w.v_proj.0, &[d, d]),
        ("q_proj.bias", w.q_proj.1, &[d]),
        ("k_proj.bias", w.k_proj.1, &[d]),
        ("v_proj.bias", w.v_proj.1, &[d]),
        ("out_proj.weight", w.out_proj.0, &[d, d]),
        ("out_proj.bias", w.out_proj.1, &[d]),
        ("layer_norm2.weight", w.layer_norm2.0, &[d]),
        ("layer_norm2.bias", w.layer_norm2.1, &[d]),
        ("fc1.weight", w.fc1.0, &[i, d]),
        ("fc1.bias", w.fc1.1, &[i]),
        ("fc2.weight", w.fc2.0, &[d, i]),
        ("fc2.bias", w.fc2.1, &[d]),
    ];
    let packed = pack("encoder layer", &want)?;
    let layer = LayerOp {
        d,
        i,
        act,
        eps: eps as f32,
        attention: PackedSlices::new((b, t, d), heads, mask)?,
    };
    apply(x, &packed, layer)
}

/// The blocks' pieces as candle primitives, the fused blocks' tests' reference.
#[cfg(test)]
pub(super) mod reference {
    use candle_core::{Tensor, D};

    /// LayerNorm as candle primitives (biased variance, as torch.nn.LayerNorm).
    pub fn layer_norm(x: &Tensor, (w, b): (&Tensor, &Tensor), eps: f64) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        c.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    }

    /// `x Wᵀ + b` as candle primitives.
    pub fn linear(x: &Tensor, (w, b): (&Tensor, &Tensor)) -> Tensor {
        x.broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use super::reference::{layer_norm, linear};

    fn act_of(act: Act, x: &Tensor) -> Tensor {
        match act {
            Act::QuickGelu => x
                .mul(&candle_nn::ops::sigmoid(&(x * 1.702).unwrap()).unwrap())
                .unwrap(),
            Act::GeluErf => x.gelu_erf().unwrap(),
        }
    }

    /// The layer as transformers' CLIPEncoderLayer writes it, in candle primitives (and the
    /// op-by-op attention of attention.rs).
    fn composed(
        x: &Tensor,
        w: &LayerParams,
        heads: usize,
        act: Act,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let eps = 1e-5;
        let h = layer_norm(x, w.layer_norm1, eps);
        let (q, k, v) = (
            linear(&h, w.q_proj),
            linear(&h, w.k_proj),
            linear(&h, w.v_proj),
        );
        let a = super::super::attention::composed(&q, &k, &v, heads, mask).unwrap();
        let x1 = (x + linear(&a, w.out_proj)).unwrap();
        let h = layer_norm(&x1, w.layer_norm2, eps);
        let h = linear(&act_of(act, &linear(&h, w.fc1)), w.fc2);
        (x1 + h).unwrap()
    }

    fn rel(a: &Tensor, c: &Tensor) -> f32 {
        crate::nn::fused::rel(a, c).unwrap()
    }

    /// Values and the gradients of x and all sixteen parameters against the composition, for
    /// both activations, with no mask and with a causal mask (the text tower's).
    #[test]
    fn the_fused_layer_matches_the_composition() {
        let dev = Device::Cpu;
        let (b, t, d, i, heads) = (3, 7, 16, 40, 4);
        let var = |shape: &[usize], mean: f32, std: f32| {
            Var::from_tensor(&Tensor::randn(mean, std, shape, &dev).unwrap()).unwrap()
        };
        let x = var(&[b, t, d], 0.0, 1.0);
        let v: Vec<Var> = [
            (vec![d], 1.0),
            (vec![d], 0.0),
            (vec![d, d], 0.0),
            (vec![d], 0.0),
            (vec![d, d], 0.0),
            (vec![d], 0.0),
            (vec![d, d], 0.0),
            (vec![d], 0.0),
            (vec![d, d], 0.0),
            (vec![d], 0.0),
            (vec![d], 1.0),
            (vec![d], 0.0),
            (vec![i, d], 0.0),
            (vec![i], 0.0),
            (vec![d, i], 0.0),
            (vec![d], 0.0),
        ]
        .into_iter()
        .map(|(s, m)| var(&s, m, 0.3))
        .collect();
        let p = |k: usize| (v[k].as_tensor(), v[k + 1].as_tensor());
        let w = LayerParams {
            layer_norm1: p(0),
            q_proj: p(2),
            k_proj: p(4),
            v_proj: p(6),
            out_proj: p(8),
            layer_norm2: p(10),
            fc1: p(12),
            fc2: p(14),
        };
        let probe = Tensor::randn(0f32, 1.0, (b, t, d), &dev).unwrap();
        let causal: Vec<f32> = (0..t * t)
            .map(|k| match k % t > k / t {
                true => super::super::attention::MASKED,
                false => 0.0,
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, t), &dev).unwrap();
        for act in [Act::QuickGelu, Act::GeluErf] {
            for mask in [None, Some(&causal)] {
                let yf = encoder_layer(x.as_tensor(), &w, heads, act, 1e-5, mask).unwrap();
                let yc = composed(x.as_tensor(), &w, heads, act, mask);
                assert!(rel(&yf, &yc) < 1e-5, "{act:?} values {}", rel(&yf, &yc));
                let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward();
                let (gf, gc) = (grads(&yf).unwrap(), grads(&yc).unwrap());
                let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap();
                let max_abs = |t: &Tensor| max_abs(t).to_scalar::<f32>().unwrap();
                for (k, t) in std::iter::once(&x).chain(v.iter()).enumerate() {
                    let (a, c) = (gf.get(t).unwrap(), gc.get(t).unwrap());
                    if k == 6 {
                        // k_proj.bias shifts every score of a query row alike, which softmax
                        // ignores: its true gradient is zero, and both sides hold rounding.
                        let scale = max_abs(gc.get(&v[7]).unwrap());
                        assert!(max_abs(a) < 1e-5 * scale, "{act:?} k bias {}", max_abs(a));
                        continue;
                    }
                    assert!(rel(a, c) < 1e-4, "{act:?} gradient {k}: {}", rel(a, c));
                }
            }
        }
    }

    #[test]
    fn a_parameter_of_the_wrong_shape_is_named() {
        let dev = Device::Cpu;
        let z = |s: &[usize]| Tensor::zeros(s, candle_core::DType::F32, &dev).unwrap();
        let (x, vec8, mat8, fc1w, fc1b, fc2w) = (
            z(&[1, 2, 8]),
            z(&[8]),
            z(&[8, 8]),
            z(&[16, 8]),
            z(&[16]),
            z(&[8, 15]),
        );
        let w = LayerParams {
            layer_norm1: (&vec8, &vec8),
            q_proj: (&mat8, &vec8),
            k_proj: (&mat8, &vec8),
            v_proj: (&mat8, &vec8),
            out_proj: (&mat8, &vec8),
            layer_norm2: (&vec8, &vec8),
            fc1: (&fc1w, &fc1b),
            fc2: (&fc2w, &vec8),
        };
        let e = encoder_layer(&x, &w, 2, Act::QuickGelu, 1e-5, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc2.weight") && e.contains("[8, 16]"), "{e}");
    }
}
