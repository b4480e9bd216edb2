//! The pre-LN transformer shared by both CLIP towers (`CLIPEncoder` / `CLIPEncoderLayer` in
//! transformers' modeling_clip.py): x + attn(ln1(x)), then x + mlp(ln2(x)).

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::nn::fused_layer::{self, LayerParams};
use crate::nn::ops::mixed_dtype;
use crate::nn::{attention, fused_attention, linear, Activation, LayerNorm, Linear};
use crate::nn::{checkpoint, fused};

/// Shape of one tower's transformer.
#[derive(Clone, Copy, Debug)]
pub struct EncoderShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub act: Activation,
    pub eps: f64,
}

#[derive(Clone, Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    /// Frozen q, k and v weights on the CPU as one projection `[3·h, h]` (stored transposed,
    /// `nn::linear`), of which the three layers above are views: one product of 3·h outputs
    /// instead of three of h.
    qkv: Option<Linear>,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        let h = s.hidden;
        let (mut q_proj, mut k_proj, mut v_proj) = (
            linear(h, h, vb.pp("q_proj"))?,
            linear(h, h, vb.pp("k_proj"))?,
            linear(h, h, vb.pp("v_proj"))?,
        );
        let qkv = stacked_frozen([&q_proj, &k_proj, &v_proj])?;
        if let Some(qkv) = &qkv {
            let (w, b) = qkv.with_bias().expect("stacked with a bias");
            let part = |i: usize| -> Result<Linear> {
                Ok(Linear::new(
                    w.narrow(0, i * h, h)?,
                    Some(b.narrow(0, i * h, h)?),
                ))
            };
            (q_proj, k_proj, v_proj) = (part(0)?, part(1)?, part(2)?);
        }
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            qkv,
            heads: s.heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        if let (Some(qkv), true) = (&self.qkv, fused_attention::supported(x)) {
            let y = attention::packed(&qkv.forward(x)?, self.heads, mask)?;
            return self.out_proj.forward(&y);
        }
        if self.q_proj.weight().track_op() && fused_attention::supported(x) {
            return self.forward_packed(x, mask);
        }
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let y = attention::multi_head(&q, &k, &v, self.heads, mask)?;
        self.out_proj.forward(&y)
    }

    /// The same in training on the CPU: q, k and v as one projection through the three weights
    /// stacked (one product forward and one for the input gradient instead of three each, and
    /// one gradient into the LayerNorm output instead of three summed), read by the packed
    /// attention kernel in place. The stacking is differentiable: each weight gets its rows of
    /// the stacked gradient.
    fn forward_packed(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        let w = Tensor::cat(&projections.map(|p| p.weight()), 0)?;
        let b = match projections.map(|p| p.bias()) {
            [Some(q), Some(k), Some(v)] => Some(Tensor::cat(&[q, k, v], 0)?),
            [None, None, None] => None,
            _ => candle_core::bail!("q, k and v projections differ in having a bias"),
        };
        let qkv = Linear::new(w, b).forward(x)?;
        let y = attention::packed(&qkv, self.heads, mask)?;
        self.out_proj.forward(&y)
    }
}

/// q, k and v stacked into one layer `[3·h, h]` stored transposed, when all three are frozen
/// float32 weights on the CPU stored so (`nn::linear`) and have biases; `None` otherwise.
fn stacked_frozen(parts: [&Linear; 3]) -> Result<Option<Linear>> {
    let mut ws = Vec::new();
    let mut bs = Vec::new();
    for p in parts {
        let (Some((w, b)), true) = (p.with_bias(), p.is_stored_transposed()) else {
            return Ok(None);
        };
        if b.track_op() {
            return Ok(None);
        }
        ws.push(w.t()?);
        bs.push(b.clone());
    }
    // [h, 3·h] row-major, seen as [3·h, h].
    let w = Tensor::cat(&ws, 1)?.t()?;
    Ok(Some(Linear::new(w, Some(Tensor::cat(&bs, 0)?))))
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        Ok(Self {
            self_attn: SelfAttention::new(vb.pp("self_attn"), s)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), s.hidden, s.eps)?,
            fc1: linear(s.hidden, s.intermediate, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(s.intermediate, s.hidden, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), s.hidden, s.eps)?,
            act: s.act,
        })
    }

    /// The layer over `x`; with `compute` another float type than `x`'s, in mixed precision:
    /// each LayerNorm's output is cast to `compute` for the attention and the MLP, whose
    /// products (and the MLP's activation) run in it, and their outputs are cast back before
    /// the residual additions; LayerNorm and the residual stream stay in `x`'s type
    /// (`train::config::Precision::Bf16`).
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, compute: Option<DType>) -> Result<Tensor> {
        let mixed = mixed_dtype(compute, x);
        if mixed.is_none() {
            if let Some(y) = self.forward_fused(x, mask)? {
                return Ok(y);
            }
        }
        let h = self.layer_norm1.forward_as(x, mixed)?;
        let x = fused::residual_add(x, &self.self_attn.forward(&h, mask)?)?;
        let h = self.layer_norm2.forward_as(&x, mixed)?;
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&h)?)?)?;
        fused::residual_add(&x, &h)
    }
}

impl EncoderLayer {
    /// The layer's sixteen parameters (the two LayerNorms' and each projection's weight and
    /// bias), in the order [`EncoderLayer::with_params`] takes them; `None` for a layer without
    /// every bias.
    fn params(&self) -> Option<Vec<Tensor>> {
        let a = &self.self_attn;
        let mut out = Vec::with_capacity(16);
        for l in [&self.layer_norm1, &self.layer_norm2] {
            out.extend([l.weight().clone(), l.bias().clone()]);
        }
        for p in [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.out_proj,
            &self.fc1,
            &self.fc2,
        ] {
            let (w, b) = p.with_bias()?;
            out.extend([w.clone(), b.clone()]);
        }
        Some(out)
    }

    /// This layer's structure over the parameters `p` ([`EncoderLayer::params`]' order).
    fn with_params(&self, p: &[Tensor]) -> Self {
        let lin = |i: usize| Linear::new(p[i].clone(), Some(p[i + 1].clone()));
        let norm =
            |i: usize, eps: f64| LayerNorm::from_tensors(p[i].clone(), p[i + 1].clone(), eps);
        Self {
            self_attn: SelfAttention {
                q_proj: lin(4),
                k_proj: lin(6),
                v_proj: lin(8),
                out_proj: lin(10),
                qkv: None,
                heads: self.self_attn.heads,
            },
            layer_norm1: norm(0, self.layer_norm1.eps()),
            fc1: lin(12),
            fc2: lin(14),
            layer_norm2: norm(2, self.layer_norm2.eps()),
            act: self.act,
        }
    }

    /// [`EncoderLayer::forward`] with gradient checkpointing (`nn::checkpoint`): only the
    /// layer's input and output are kept for the backward pass, which runs the layer again.
    fn forward_checkpointed(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        compute: Option<DType>,
    ) -> Result<Tensor> {
        let Some(params) = self.params() else {
            return self.forward(x, mask, compute);
        };
        let (shape, mask) = (self.clone(), mask.cloned());
        let block: checkpoint::Block = std::sync::Arc::new(move |x: &Tensor, p: &[Tensor]| {
            shape.with_params(p).forward(x, mask.as_ref(), compute)
        });
        checkpoint::checkpointed(x, &params, block)
    }

    /// The same in training on the CPU (float32, trainable weights): the whole layer as one op
    /// with its own backward (`nn::fused_layer`). `None` where it does not apply (inference,
    /// frozen weights, another device or dtype, an activation the fused kernels lack).
    fn forward_fused(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
        let Some(act) = self.act.fused_kernel() else {
            return Ok(None);
        };
        if !(self.layer_norm1.weight().track_op() && fused::supported(x)) {
            return Ok(None);
        }
        let a = &self.self_attn;
        fn norm(l: &LayerNorm) -> (&Tensor, &Tensor) {
            (l.weight(), l.bias())
        }
        let (Some(q), Some(k), Some(v), Some(o), Some(fc1), Some(fc2)) = (
            a.q_proj.with_bias(),
            a.k_proj.with_bias(),
            a.v_proj.with_bias(),
            a.out_proj.with_bias(),
            self.fc1.with_bias(),
            self.fc2.with_bias(),
        ) else {
            return Ok(None);
        };
        let params = LayerParams {
            layer_norm1: norm(&self.layer_norm1),
            q_proj: q,
            k_proj: k,
            v_proj: v,
            out_proj: o,
            layer_norm2: norm(&self.layer_norm2),
            fc1,
            fc2,
        };
        let eps = self.layer_norm1.eps();
        fused_layer::encoder_layer(x, &params, a.heads, act, eps, mask).map(Some)
    }
}

/// `{prefix}.layers.{i}.*`.
#[derive(Clone, Debug)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    /// The float type of the layers' products in mixed precision (`set_compute`); `None`: the
    /// input's.
    compute: Option<DType>,
    /// Gradient checkpointing per layer (`set_checkpointing`).
    checkpointing: bool,
}

impl Encoder {
    pub fn new(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        let layers = (0..s.layers)
            .map(|i| EncoderLayer::new(vb.pp("layers").pp(i), s))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            compute: None,
            checkpointing: false,
        })
    }

    /// Gradient checkpointing (`train.grad_checkpointing`): in training, each layer keeps only
    /// its input and output for the backward pass and runs again there (`nn::checkpoint`).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Runs the layers' products in `dtype` from now on (mixed precision, see
    /// [`EncoderLayer::forward`]); the input's own type when it is the same.
    pub fn set_compute(&mut self, dtype: DType) {
        self.compute = Some(dtype);
    }

    /// Runs every layer; `upto` stops after that many layers (the penultimate-layer features
    /// that BLIP-2 takes from a frozen encoder).
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        upto: Option<usize>,
    ) -> Result<Tensor> {
        let n = upto.unwrap_or(self.layers.len()).min(self.layers.len());
        let mut x = x.clone();
        for layer in &self.layers[..n] {
            x = match self.checkpointing {
                true => layer.forward_checkpointed(&x, mask, self.compute)?,
                false => layer.forward(&x, mask, self.compute)?,
            };
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// Two layers of 32 wide, 4 heads.
    fn test_shape() -> EncoderShape {
        EncoderShape {
            hidden: 32,
            intermediate: 64,
            heads: 4,
            layers: 2,
            act: Activation::QuickGelu,
            eps: 1e-5,
        }
    }

    /// Mixed precision: with bfloat16 products the encoder's output and every master weight's
    /// gradient stay float32 and agree with the float32 encoder's to bfloat16's precision (8
    /// significant bits: a few tenths of a percent per product, here within 3% of each
    /// tensor's largest value; seen: at most 1.7%), and differ from them (the products did run in bfloat16).
    #[test]
    fn bf16_products_keep_float32_outputs_and_master_gradients() {
        let dev = Device::Cpu;
        let s = test_shape();
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let plain = Encoder::new(vb.clone(), &s).unwrap();
        let mut mixed = Encoder::new(vb, &s).unwrap();
        mixed.set_compute(DType::BF16);
        let x = Tensor::randn(0f32, 1.0, (3, 7, 32), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 7, 32), &dev).unwrap();
        let run = |e: &Encoder| {
            let y = e.forward(&x, None, None).unwrap();
            let g = y
                .mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, g)
        };
        let ((y32, g32), (y16, g16)) = (run(&plain), run(&mixed));
        assert_eq!(y16.dtype(), DType::F32);
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let close = |what: &str, a: &Tensor, b: &Tensor| {
            let d = max(&(a - b).unwrap());
            assert!(d <= 0.03 * max(a) && d > 0.0, "{what}: {d} of {}", max(a));
        };
        close("output", &y32, &y16);
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), 2 * 16);
        for (name, v) in data.iter() {
            let (a, b) = (g32.get(v).unwrap(), g16.get(v).unwrap());
            assert_eq!(b.dtype(), DType::F32);
            if name.ends_with("k_proj.bias") {
                // Invariant: softmax ignores a shift of a whole score row, which is all a key
                // bias makes, so its true gradient is zero and only rounding remains; in
                // bfloat16 it stays small beside the query bias's gradient.
                let q = max(g16.get(&data[&name.replace("k_proj", "q_proj")]).unwrap());
                assert!(max(b) < 0.05 * q, "{name}: {} vs q_proj.bias {q}", max(b));
                continue;
            }
            close(name, a, b);
        }
    }

    /// An inference encoder (frozen weights: q, k and v stacked into one transposed projection)
    /// gives the per-op composition's output over separate, row-major weights
    /// (`keeping_layout`), with and without a causal mask.
    #[test]
    fn stacked_frozen_qkv_matches_the_separate_projections() {
        let dev = Device::Cpu;
        let s = test_shape();
        let varmap = candle_nn::VarMap::new();
        Encoder::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &s).unwrap();
        let tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                // Non-zero biases, so that their stacking is checked too.
                let t = v.as_tensor().detach();
                let t = match k.ends_with("bias") {
                    true => Tensor::randn(0f32, 0.5, t.shape(), &dev).unwrap(),
                    false => t,
                };
                (k.clone(), t)
            })
            .collect();
        let build = || {
            Encoder::new(
                VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev),
                &s,
            )
            .unwrap()
        };
        let stacked = build();
        let separate = crate::nn::linear::keeping_layout(build);
        assert!(stacked.layers.iter().all(|l| l.self_attn.qkv.is_some()));
        assert!(separate.layers.iter().all(|l| l.self_attn.qkv.is_none()));
        let x = Tensor::randn(0f32, 1.0, (3, 7, 32), &dev).unwrap();
        let causal: Vec<f32> = (0..7 * 7)
            .map(|i| {
                if i % 7 <= i / 7 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, 7, 7), &dev).unwrap();
        for mask in [None, Some(&causal)] {
            let (a, b) = (
                stacked.forward(&x, mask, None).unwrap(),
                separate.forward(&x, mask, None).unwrap(),
            );
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "mask {}: {diff}", mask.is_some());
        }
    }
}
