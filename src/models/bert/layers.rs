//! The post-LN blocks of BERT (Devlin et al. 2019; transformers' modeling_bert.py
//! `BertAttention`, `BertIntermediate` + `BertOutput`), shared with the BLIP-2 Q-Former, which
//! is a BERT whose layers add cross-attention and a second feed-forward for the query tokens.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::nn::fused;
use crate::nn::fused_post_ln::{self, AttentionParams, FeedForwardParams};
use crate::nn::ops::{cast_to, mixed_dtype};
use crate::nn::{attention, linear, Activation, LayerNorm, Linear};

/// `LayerNorm(dense(attention(x, kv)) + x)`: multi-head attention (BERT's `*.self` or the
/// Q-Former's `*.attention`) followed by `output.dense` and `output.LayerNorm`.
#[derive(Clone, Debug)]
pub struct PostLnAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    heads: usize,
    /// Mixed precision: the float type of the block's products (`set_compute`).
    compute: Option<DType>,
}

impl PostLnAttention {
    /// `qkv` holds `query`/`key`/`value`, `out` holds `dense`/`LayerNorm`; keys and values are
    /// projected from `kv_dim` (the image features' width in cross-attention).
    pub fn new(
        qkv: VarBuilder,
        out: VarBuilder,
        hidden: usize,
        kv_dim: usize,
        heads: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            query: linear(hidden, hidden, qkv.pp("query"))?,
            key: linear(kv_dim, hidden, qkv.pp("key"))?,
            value: linear(kv_dim, hidden, qkv.pp("value"))?,
            dense: linear(hidden, hidden, out.pp("dense"))?,
            layer_norm: LayerNorm::new(out.pp("LayerNorm"), hidden, eps)?,
            heads,
            compute: None,
        })
    }

    /// Mixed precision (`train.precision = "bf16"`): the projections and attention products in
    /// `dtype`, the residual addition and LayerNorm in the input's type.
    pub fn set_compute(&mut self, dtype: DType) {
        self.compute = Some(dtype);
    }

    /// Self-attention when `kv` is `None`, else cross-attention to `kv`; `mask` is additive and
    /// broadcasts to `[B, heads, Tq, Tk]`.
    pub fn forward(
        &self,
        x: &Tensor,
        kv: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mixed = mixed_dtype(self.compute, x);
        if mixed.is_none() {
            if let Some(y) = self.forward_fused(x, kv, mask)? {
                return Ok(y);
            }
        }
        let (xc, src) = (cast_to(x, mixed)?, cast_to(kv.unwrap_or(x), mixed)?);
        let y = attention::multi_head(
            &self.query.forward(&xc)?,
            &self.key.forward(&src)?,
            &self.value.forward(&src)?,
            self.heads,
            mask,
        )?;
        let y = self.dense.forward(&y)?.to_dtype(x.dtype())?;
        self.layer_norm.forward(&(y + x)?)
    }
}

impl PostLnAttention {
    /// The same in training on the CPU (float32, trainable weights): the block as one op with
    /// its own backward (`nn::fused_post_ln`). `None` where it does not apply.
    fn forward_fused(
        &self,
        x: &Tensor,
        kv: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        if !(self.query.weight().track_op() && fused::supported(x)) {
            return Ok(None);
        }
        let (Some(query), Some(key), Some(value), Some(dense)) = (
            self.query.with_bias(),
            self.key.with_bias(),
            self.value.with_bias(),
            self.dense.with_bias(),
        ) else {
            return Ok(None);
        };
        let w = AttentionParams {
            query,
            key,
            value,
            dense,
            layer_norm: (self.layer_norm.weight(), self.layer_norm.bias()),
        };
        let eps = self.layer_norm.eps();
        fused_post_ln::attention_block(x, kv, &w, self.heads, eps, mask).map(Some)
    }
}

/// `LayerNorm(output(act(intermediate(x))) + x)`.
#[derive(Clone, Debug)]
pub struct FeedForward {
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    act: Activation,
    /// Mixed precision: the float type of the block's products (`set_compute`).
    compute: Option<DType>,
}

impl FeedForward {
    /// `inter` holds `dense` (hidden → inner), `out` holds `dense` (inner → hidden) and `LayerNorm`.
    pub fn new(
        inter: VarBuilder,
        out: VarBuilder,
        hidden: usize,
        inner: usize,
        act: Activation,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            intermediate: linear(hidden, inner, inter.pp("dense"))?,
            output: linear(inner, hidden, out.pp("dense"))?,
            layer_norm: LayerNorm::new(out.pp("LayerNorm"), hidden, eps)?,
            act,
            compute: None,
        })
    }

    /// Mixed precision: both products and the activation in `dtype`, the residual addition
    /// and LayerNorm in the input's type.
    pub fn set_compute(&mut self, dtype: DType) {
        self.compute = Some(dtype);
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mixed = mixed_dtype(self.compute, x);
        if mixed.is_none() {
            if let Some(y) = self.forward_fused(x)? {
                return Ok(y);
            }
        }
        let xc = cast_to(x, mixed)?;
        let h = self.act.forward(&self.intermediate.forward(&xc)?)?;
        let y = self.output.forward(&h)?.to_dtype(x.dtype())?;
        self.layer_norm.forward(&(y + x)?)
    }
}

impl FeedForward {
    /// The same in training on the CPU (float32, trainable weights, an activation with a fused
    /// kernel): the block as one op with its own backward (`nn::fused_post_ln`).
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(act) = self.act.fused_kernel() else {
            return Ok(None);
        };
        if !(self.intermediate.weight().track_op() && fused::supported(x)) {
            return Ok(None);
        }
        let (Some(fc1), Some(fc2)) = (self.intermediate.with_bias(), self.output.with_bias())
        else {
            return Ok(None);
        };
        let w = FeedForwardParams {
            fc1,
            fc2,
            layer_norm: (self.layer_norm.weight(), self.layer_norm.bias()),
        };
        fused_post_ln::feed_forward(x, &w, act, self.layer_norm.eps()).map(Some)
    }
}
