//! BERT's post-LN blocks, each as one CPU op forward and one backward (transformers'
//! modeling_bert.py `BertAttention` = self-attention + `BertSelfOutput`, and `BertIntermediate`
//! + `BertOutput`; the Q-Former's layers are made of them, LAVIS `Qformer.py`):
//! - attention: `LayerNorm(x + dense(attention(q(x), k(src), v(src))))`, self-attention
//!   (`src` = `x`, q, k and v one product over the stacked weights) or cross-attention (`src`
//!   the image features, k and v one product);
//! - feed-forward: `LayerNorm(x + fc2(act(fc1(x))))`.
//!
//! As with the CLIP layer (`fused_layer`, which says why), a block is one graph node over its
//! inputs and its parameters packed by a `cat`; the residual add rides in the last product
//! forward and in the input-gradient product backward; the forward keeps the activations
//! the backward reads. Tests hold each block to a composition of candle primitives.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused::{
    column_sum, f32s, layer_norm_dx, layer_norm_forward, rows_plus, with_f32s, Act,
};
use super::fused_attention::{CrossSlices, PackedSlices};
use super::fused_layer::{apply, keep, mlp_forward, pack, saved, split, split_mut, Block, Mlp};
use super::fused_linear::Dims;
use super::fused_linear::{forward as linear_forward, input_grad, product_into, weight_grad_to};

/// `dx = ds + dh Wᵀ…`: the input gradient of `x` through a linear layer (`dh` `[rows, n]`, `w`
/// `[n, k]`) plus the residual's `ds`, in one product that starts from `ds`.
fn input_grad_plus(d: Dims, dh: &[f32], w: &[f32], ds: Vec<f32>) -> Vec<f32> {
    product_into((d.rows, d.k, d.n), Some(ds), (dh, (d.n, 1)), (w, (d.k, 1)))
}

// ---------------------------------------------------------------------------------------------
// Feed-forward

/// Lengths of the feed-forward's packed parameters (width `d`, inner `i`): W1 `[i, d]`, b1,
/// W2 `[d, i]`, b2, LayerNorm weight, bias.
fn ffn_lens(d: usize, i: usize) -> [usize; 6] {
    [i * d, i, d * i, d, d, d]
}

struct FfnSaved {
    /// fc1's output before the activation.
    u: Vec<f32>,
    /// act(u), fc2's input.
    a: Vec<f32>,
    /// x + fc2(a): the LayerNorm's input.
    s: Vec<f32>,
}

struct FeedForwardOp {
    d: usize,
    i: usize,
    act: Act,
    eps: f32,
}

impl Block for FeedForwardOp {
    type Saved = FfnSaved;
    const NAME: &'static str = "vlalign-post-ln-feed-forward";

    fn forward(&self, x: &[f32], p: &[f32]) -> (Vec<f32>, FfnSaved) {
        let [w1, b1, w2, b2, lnw, lnb] = split(p, ffn_lens(self.d, self.i));
        let (u, a, s) = mlp_forward(x, x, [w1, b1, w2, b2], self.act);
        let out = layer_norm_forward(&s, lnw, lnb, self.d, self.eps);
        (out, FfnSaved { u, a, s })
    }

    fn backward(&self, sv: &FfnSaved, x: &[f32], p: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (d, i) = (self.d, self.i);
        let [w1, _, w2, _, lnw, _] = split(p, ffn_lens(d, i));
        let mut dp = vec![0f32; p.len()];
        let [dw1, db1, dw2, db2, dlnw, dlnb] = split_mut(&mut dp, ffn_lens(d, i));
        let ds = layer_norm_dx((&sv.s, lnw, g), self.eps, (dlnw, dlnb));
        let mlp = Mlp {
            x,
            u: &sv.u,
            a: &sv.a,
            w: [w1, w2],
            act: self.act,
        };
        // dx: through the MLP, plus the residual's ds.
        let dx = mlp.backward(&ds.clone(), [dw1, db1, dw2, db2], Some(ds));
        (dx, dp)
    }
}

/// The parameters of a post-LN feed-forward: (weight, bias) of `fc1` (`intermediate.dense`,
/// `[i, d]`), `fc2` (`output.dense`, `[d, i]`) and the LayerNorm (`output.LayerNorm`).
pub struct FeedForwardParams<'a> {
    pub fc1: (&'a Tensor, &'a Tensor),
    pub fc2: (&'a Tensor, &'a Tensor),
    pub layer_norm: (&'a Tensor, &'a Tensor),
}

/// `LayerNorm(x + fc2(act(fc1(x))))` over `x` `[.., d]`, differentiable in `x` and every
/// parameter.
pub fn feed_forward(x: &Tensor, w: &FeedForwardParams, act: Act, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    let i = w.fc1.0.dims().first().copied().unwrap_or(0);
    let packed = pack(
        "feed-forward",
        &[
            ("intermediate.dense.weight", w.fc1.0, &[i, d]),
            ("intermediate.dense.bias", w.fc1.1, &[i]),
            ("output.dense.weight", w.fc2.0, &[d, i]),
            ("output.dense.bias", w.fc2.1, &[d]),
            ("output.LayerNorm.weight", w.layer_norm.0, &[d]),
            ("output.LayerNorm.bias", w.layer_norm.1, &[d]),
        ],
    )?;
    let block = FeedForwardOp {
        d,
        i,
        act,
        eps: eps as f32,
    };
    apply(x, &packed, block)
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Lengths of the attention block's packed parameters (width `d`, key/value source width `e`):
/// the stacked projection weights Wq `[d, d]` | Wk `[d, e]` | Wv `[d, e]`, the stacked biases
/// bq | bk | bv, Wo `[d, d]`, bo, LayerNorm weight, bias. In self-attention (e = d) the first
/// two are W_qkv and b_qkv; in cross-attention their parts after Wq / bq are W_kv and b_kv.
fn attn_lens(d: usize, e: usize) -> [usize; 6] {
    [d * d + 2 * d * e, 3 * d, d * d, d, d, d]
}

/// How the block attends: to itself (q, k, v one product), or to `src` rows (q one product, k
/// and v another).
enum Attend {
    Own(PackedSlices),
    Cross(CrossSlices),
}

struct AttnSaved {
    /// Self: q | k | v `[rows, 3d]`; cross: q `[rows, d]`.
    q: Vec<f32>,
    /// Cross only: k | v `[src rows, 2d]`.
    kv: Vec<f32>,
    /// The attention output, dense's input.
    attn: Vec<f32>,
    /// x + dense(attn): the LayerNorm's input.
    s: Vec<f32>,
}

struct AttentionOp {
    d: usize,
    e: usize,
    eps: f32,
    attend: Attend,
}

impl AttentionOp {
    fn forward(&self, x: &[f32], src: &[f32], p: &[f32]) -> (Vec<f32>, AttnSaved) {
        let (d, e) = (self.d, self.e);
        let [w_qkv, b_qkv, wo, bo, lnw, lnb] = split(p, attn_lens(d, e));
        let rows = x.len() / d;
        let (q, kv, attn) = match &self.attend {
            Attend::Own(a) => {
                let qkv = linear_forward(
                    Dims {
                        rows,
                        k: d,
                        n: 3 * d,
                    },
                    x,
                    w_qkv,
                    Some(b_qkv),
                );
                let attn = a.forward(&qkv);
                (qkv, Vec::new(), attn)
            }
            Attend::Cross(a) => {
                let ((wq, w_kv), (bq, b_kv)) = (w_qkv.split_at(d * d), b_qkv.split_at(d));
                let q = linear_forward(Dims { rows, k: d, n: d }, x, wq, Some(bq));
                let src_rows = src.len() / e;
                let kv = linear_forward(
                    Dims {
                        rows: src_rows,
                        k: e,
                        n: 2 * d,
                    },
                    src,
                    w_kv,
                    Some(b_kv),
                );
                let attn = a.forward(&q, &kv);
                (q, kv, attn)
            }
        };
        let s = product_into(
            (rows, d, d),
            Some(rows_plus(x, bo)),
            (&attn, (d, 1)),
            (wo, (1, d)),
        );
        let out = layer_norm_forward(&s, lnw, lnb, d, self.eps);
        (out, AttnSaved { q, kv, attn, s })
    }

    /// dx, d(src) (cross-attention to a source that takes a gradient, `src_grad`: frozen image
    /// features take none) and the packed parameters' gradient.
    fn backward(
        &self,
        sv: &AttnSaved,
        (x, src, p): (&[f32], &[f32], &[f32]),
        g: &[f32],
        src_grad: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>) {
        let (d, e) = (self.d, self.e);
        let [w_qkv, _, wo, _, lnw, _] = split(p, attn_lens(d, e));
        let rows = x.len() / d;
        let mut dp = vec![0f32; p.len()];
        let [dw_qkv, db_qkv, dwo, dbo, dlnw, dlnb] = split_mut(&mut dp, attn_lens(d, e));
        let ds = layer_norm_dx((&sv.s, lnw, g), self.eps, (dlnw, dlnb));
        let dense = Dims { rows, k: d, n: d };
        dbo.copy_from_slice(&column_sum(&ds, d));
        weight_grad_to(dense, &ds, &sv.attn, dwo);
        let dattn = input_grad(dense, &ds, wo);
        match &self.attend {
            Attend::Own(a) => {
                let dqkv = a.backward(&sv.q, &dattn);
                let proj = Dims {
                    rows,
                    k: d,
                    n: 3 * d,
                };
                db_qkv.copy_from_slice(&column_sum(&dqkv, 3 * d));
                weight_grad_to(proj, &dqkv, x, dw_qkv);
                let dx = input_grad_plus(proj, &dqkv, w_qkv, ds);
                (dx, None, dp)
            }
            Attend::Cross(a) => {
                let (dq, dkv) = a.backward(&sv.q, &sv.kv, &dattn);
                let (wq, w_kv) = w_qkv.split_at(d * d);
                let (dwq, dw_kv) = dw_qkv.split_at_mut(d * d);
                let (dbq, db_kv) = db_qkv.split_at_mut(d);
                let proj_q = Dims { rows, k: d, n: d };
                dbq.copy_from_slice(&column_sum(&dq, d));
                weight_grad_to(proj_q, &dq, x, dwq);
                let dx = input_grad_plus(proj_q, &dq, wq, ds);
                let proj_kv = Dims {
                    rows: src.len() / e,
                    k: e,
                    n: 2 * d,
                };
                db_kv.copy_from_slice(&column_sum(&dkv, 2 * d));
                weight_grad_to(proj_kv, &dkv, src, dw_kv);
                let dsrc = src_grad.then(|| input_grad(proj_kv, &dkv, w_kv));
                (dx, dsrc, dp)
            }
        }
    }
}

/// Self-attention: a block over (x, parameters).
struct SelfAttentionOp(AttentionOp);

impl Block for SelfAttentionOp {
    type Saved = AttnSaved;
    const NAME: &'static str = "vlalign-post-ln-self-attention";

    fn forward(&self, x: &[f32], p: &[f32]) -> (Vec<f32>, AttnSaved) {
        self.0.forward(x, x, p)
    }

    fn backward(&self, s: &AttnSaved, x: &[f32], p: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (dx, _, dp) = self.0.backward(s, (x, x, p), g, false);
        (dx, dp)
    }
}

/// Cross-attention: the op over (x, src, parameters), with the slot its forward's activations
/// wait in.
struct CrossAttentionOp(AttentionOp, Mutex<Option<AttnSaved>>);

impl CustomOp3 for CrossAttentionOp {
    fn name(&self) -> &'static str {
        "vlalign-post-ln-cross-attention"
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
        let x = f32s(s1, l1, "cross-attention input")?;
        let src = f32s(s2, l2, "cross-attention source")?;
        let p = f32s(s3, l3, "cross-attention parameters")?;
        let (out, sv) = self.0.forward(x, src, p);
        keep(&self.1, sv)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        src: &Tensor,
        p: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let slot = saved(&self.1)?;
        let sv = slot.as_ref().expect("checked by saved()");
        let (dx, dsrc, dp) = with_f32s(
            [x, src, p, &dout],
            "cross-attention backward operand",
            |[x, s, p, g]| Ok(self.0.backward(sv, (x, s, p), g, src.track_op())),
        )?;
        let dev = x.device();
        let dsrc = match dsrc {
            Some(v) => Some(Tensor::from_vec(v, src.shape(), dev)?),
            None => None,
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            dsrc,
            Some(Tensor::from_vec(dp, p.shape(), dev)?),
        ))
    }
}

/// The parameters of a post-LN attention block: (weight, bias) of `query` `[d, d]`, `key` and
/// `value` `[d, e]` (`e` = the source's width), `dense` `[d, d]` and the LayerNorm.
pub struct AttentionParams<'a> {
    pub query: (&'a Tensor, &'a Tensor),
    pub key: (&'a Tensor, &'a Tensor),
    pub value: (&'a Tensor, &'a Tensor),
    pub dense: (&'a Tensor, &'a Tensor),
    pub layer_norm: (&'a Tensor, &'a Tensor),
}

/// `LayerNorm(x + dense(attention))` over `x` `[B, Tq, d]`: self-attention when `src` is `None`,
/// else cross-attention to `src` `[B, Tk, e]`; `heads` heads, the additive `mask` as
/// [`super::fused_attention::attention`]'s. Differentiable in `x`, `src` and every parameter.
pub fn attention_block(
    x: &Tensor,
    src: Option<&Tensor>,
    w: &AttentionParams,
    heads: usize,
    eps: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, tq, d) = x.dims3()?;
    let e = match src {
        Some(s) => s.dims3()?.2,
        None => d,
    };
    let packed = pack(
        "attention",
        &[
            ("query.weight", w.query.0, &[d, d]),
            ("key.weight", w.key.0, &[d, e]),
            ("value.weight", w.value.0, &[d, e]),
            ("query.bias", w.query.1, &[d]),
            ("key.bias", w.key.1, &[d]),
            ("value.bias", w.value.1, &[d]),
            ("output.dense.weight", w.dense.0, &[d, d]),
            ("output.dense.bias", w.dense.1, &[d]),
            ("output.LayerNorm.weight", w.layer_norm.0, &[d]),
            ("output.LayerNorm.bias", w.layer_norm.1, &[d]),
        ],
    )?;
    let op = |attend| AttentionOp {
        d,
        e,
        eps: eps as f32,
        attend,
    };
    match src {
        None => {
            let attend = Attend::Own(PackedSlices::new((b, tq, d), heads, mask)?);
            apply(x, &packed, SelfAttentionOp(op(attend)))
        }
        Some(src) => {
            let (sb, tk, _) = src.dims3()?;
            if sb != b {
                bail!("cross-attention: {b} query rows attend to a source batch of {sb}");
            }
            let attend = Attend::Cross(CrossSlices::new((b, tq, tk, d), heads, mask)?);
            let cross = CrossAttentionOp(op(attend), Mutex::new(None));
            x.contiguous()?
                .apply_op3(&src.contiguous()?, &packed, cross)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::nn::fused_layer::reference::linear;

    /// BERT's LayerNorm (epsilon 1e-12).
    fn layer_norm(x: &Tensor, wb: (&Tensor, &Tensor)) -> Tensor {
        crate::nn::fused_layer::reference::layer_norm(x, wb, 1e-12)
    }

    fn rel(a: &Tensor, c: &Tensor) -> f32 {
        crate::nn::fused::rel(a, c).unwrap()
    }

    fn vars(shapes: &[(Vec<usize>, f32)]) -> Vec<Var> {
        let dev = Device::Cpu;
        shapes
            .iter()
            .map(|(s, m)| {
                Var::from_tensor(&Tensor::randn(*m, 0.3, s.as_slice(), &dev).unwrap()).unwrap()
            })
            .collect()
    }

    /// The gradients of Σ y ⊙ probe for `yf` and `yc` agree for every tensor in `ts`, except
    /// the ones listed in `zero` (true gradient zero: both sides must be rounding-small).
    fn same_gradients(yf: &Tensor, yc: &Tensor, ts: &[&Var], zero: &[usize], what: &str) {
        let probe = Tensor::randn(0f32, 1.0, yc.shape(), yc.device()).unwrap();
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gc) = (grads(yf), grads(yc));
        let max_abs = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for (k, t) in ts.iter().enumerate() {
            let (a, c) = (gf.get(t).unwrap(), gc.get(t).unwrap());
            if zero.contains(&k) {
                assert!(max_abs(a) < 1e-4, "{what} gradient {k}: {}", max_abs(a));
                continue;
            }
            assert!(rel(a, c) < 1e-4, "{what} gradient {k}: {}", rel(a, c));
        }
    }

    #[test]
    fn the_fused_feed_forward_matches_the_composition() {
        let (b, t, d, i) = (3, 5, 16, 40);
        let v = vars(&[
            (vec![b, t, d], 0.0),
            (vec![i, d], 0.0),
            (vec![i], 0.0),
            (vec![d, i], 0.0),
            (vec![d], 0.0),
            (vec![d], 1.0),
            (vec![d], 0.0),
        ]);
        let p = |k: usize| (v[k].as_tensor(), v[k + 1].as_tensor());
        let w = FeedForwardParams {
            fc1: p(1),
            fc2: p(3),
            layer_norm: p(5),
        };
        let x = v[0].as_tensor();
        let yf = feed_forward(x, &w, Act::GeluErf, 1e-12).unwrap();
        let h = linear(&linear(x, w.fc1).gelu_erf().unwrap(), w.fc2);
        let yc = layer_norm(&(x + h).unwrap(), w.layer_norm);
        assert!(rel(&yf, &yc) < 1e-5, "values {}", rel(&yf, &yc));
        same_gradients(&yf, &yc, &v.iter().collect::<Vec<_>>(), &[], "feed-forward");
    }

    /// Self-attention under a per-sample mask with a fully blocked row, and cross-attention to
    /// a source of another width and length.
    #[test]
    fn the_fused_attention_block_matches_the_composition() {
        let dev = Device::Cpu;
        let (b, t, d, heads) = (3, 6, 16, 4);
        for (tk, e) in [(t, d), (9, 24)] {
            let cross = tk != t;
            let v = vars(&[
                (vec![b, t, d], 0.0),
                (vec![b, tk, e], 0.0),
                (vec![d, d], 0.0),
                (vec![d], 0.0),
                (vec![d, e], 0.0),
                (vec![d], 0.0),
                (vec![d, e], 0.0),
                (vec![d], 0.0),
                (vec![d, d], 0.0),
                (vec![d], 0.0),
                (vec![d], 1.0),
                (vec![d], 0.0),
            ]);
            let p = |k: usize| (v[k].as_tensor(), v[k + 1].as_tensor());
            let w = AttentionParams {
                query: p(2),
                key: p(4),
                value: p(6),
                dense: p(8),
                layer_norm: p(10),
            };
            let blocked = super::super::attention::MASKED;
            let mut m: Vec<f32> = (0..b * t * tk)
                .map(|k| if (k * 7) % 5 == 0 { blocked } else { 0.0 })
                .collect();
            m[..tk].iter_mut().for_each(|x| *x = blocked);
            let mask = Tensor::from_vec(m, (b, 1, t, tk), &dev).unwrap();
            let x = v[0].as_tensor();
            let src = if cross { v[1].as_tensor() } else { x };
            let yf =
                attention_block(x, cross.then_some(src), &w, heads, 1e-12, Some(&mask)).unwrap();
            let (q, k, vv) = (linear(x, w.query), linear(src, w.key), linear(src, w.value));
            let a = super::super::attention::composed(&q, &k, &vv, heads, Some(&mask)).unwrap();
            let yc = layer_norm(&(x + linear(&a, w.dense)).unwrap(), w.layer_norm);
            assert!(
                rel(&yf, &yc) < 1e-5,
                "cross {cross} values {}",
                rel(&yf, &yc)
            );
            let mut ts: Vec<&Var> = v.iter().collect();
            if !cross {
                ts.remove(1); // the unused source
            }
            // key.bias (index 5, or 4 without the source) shifts a query row's scores alike.
            let zero = [if cross { 5 } else { 4 }];
            same_gradients(&yf, &yc, &ts, &zero, if cross { "cross" } else { "self" });
        }
    }

    #[test]
    fn a_parameter_of_the_wrong_shape_is_named() {
        let dev = Device::Cpu;
        let z = |s: &[usize]| Tensor::zeros(s, candle_core::DType::F32, &dev).unwrap();
        let (x, v8, w1, b1, w2) = (z(&[1, 2, 8]), z(&[8]), z(&[16, 8]), z(&[16]), z(&[8, 8]));
        let w = FeedForwardParams {
            fc1: (&w1, &b1),
            fc2: (&w2, &v8),
            layer_norm: (&v8, &v8),
        };
        let e = feed_forward(&x, &w, Act::GeluErf, 1e-12)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("output.dense.weight") && e.contains("[8, 16]"),
            "{e}"
        );
    }
}
