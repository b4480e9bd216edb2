//! The pre-LN transformer shared by both CLIP towers (`CLIPEncoder` / `CLIPEncoderLayer` in
//! transformers' modeling_clip.py): x + attn(ln1(x)), then x + mlp(ln2(x)).

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::nn::fused;
use crate::nn::fused_layer::{self, LayerParams};
use crate::nn::{attention, fused_attention, linear, Activation, LayerNorm, Linear};

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
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        let h = s.hidden;
        Ok(Self {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            heads: s.heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
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

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(x, mask)? {
            return Ok(y);
        }
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = self.fc2.forward(&self.act.forward(&h)?)?;
        x + h
    }
}

impl EncoderLayer {
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
}

impl Encoder {
    pub fn new(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        let layers = (0..s.layers)
            .map(|i| EncoderLayer::new(vb.pp("layers").pp(i), s))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
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
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }
}
