//! transformers' `Blip2VisionModel` (modeling_blip_2.py), BLIP-2's EVA-style ViT: a patch
//! convolution with bias, a class token, learned positions, pre-LN blocks with one fused `qkv`
//! projection, and `post_layernorm` over every token (LAVIS's `ln_vision`, BLIP-2 §3.1).

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::config::Blip2VisionConfig;
use crate::models::clip::vision::normal;
use crate::nn::fused::residual_add;
use crate::nn::ops::mixed_dtype;
use crate::nn::{attention, linear, linear_no_bias, Activation, LayerNorm, Linear};

#[derive(Clone, Debug)]
struct Block {
    layer_norm1: LayerNorm,
    qkv: Linear,
    projection: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
    /// Mixed precision ([`Blip2Vision::set_compute`]): the float type of the block's products.
    compute: Option<DType>,
}

impl Block {
    fn new(vb: VarBuilder, c: &Blip2VisionConfig) -> Result<Self> {
        let h = c.hidden_size;
        let att = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), h, c.layer_norm_eps)?,
            qkv: if c.qkv_bias {
                linear(h, 3 * h, att.pp("qkv"))?
            } else {
                linear_no_bias(h, 3 * h, att.pp("qkv"))?
            },
            projection: linear(h, h, att.pp("projection"))?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), h, c.layer_norm_eps)?,
            fc1: linear(h, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            compute: None,
        })
    }

    /// As CLIP's encoder layer: in mixed precision each LayerNorm's output is cast to `compute`
    /// for the attention and the MLP, and their outputs back to `x`'s type for the residual.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.dim(2)?;
        let mixed = mixed_dtype(self.compute, x);
        let qkv = self.qkv.forward(&self.layer_norm1.forward_as(x, mixed)?)?;
        // Rows [0, h) of the fused weight are the queries, [h, 2h) the keys, [2h, 3h) the values.
        let (q, k, v) = (
            qkv.narrow(2, 0, h)?,
            qkv.narrow(2, h, h)?,
            qkv.narrow(2, 2 * h, h)?,
        );
        let a = attention::multi_head(&q, &k, &v, self.heads, None)?;
        let x = residual_add(x, &self.projection.forward(&a)?)?;
        let m = self.fc1.forward(&self.layer_norm2.forward_as(&x, mixed)?)?;
        residual_add(&x, &self.fc2.forward(&self.act.forward(&m)?)?)
    }
}

#[derive(Clone, Debug)]
pub struct Blip2Vision {
    class_embedding: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    layers: Vec<Block>,
    post_layernorm: LayerNorm,
    cfg: Blip2VisionConfig,
}

impl Blip2Vision {
    /// `vb` points at `vision_model`.
    pub fn new(vb: VarBuilder, c: &Blip2VisionConfig) -> Result<Self> {
        let h = c.hidden_size;
        let emb = vb.pp("embeddings");
        let g = c.image_size / c.patch_size;
        Ok(Self {
            class_embedding: emb.get_with_hints((1, 1, h), "class_embedding", normal(0.02))?,
            patch_weight: emb.get_with_hints(
                (h, 3, c.patch_size, c.patch_size),
                "patch_embedding.weight",
                normal(0.02),
            )?,
            patch_bias: emb.get_with_hints(
                h,
                "patch_embedding.bias",
                candle_nn::Init::Const(0.0),
            )?,
            position_embedding: emb.get_with_hints(
                (1, g * g + 1, h),
                "position_embedding",
                normal(0.02),
            )?,
            layers: (0..c.num_hidden_layers)
                .map(|i| Block::new(vb.pp("encoder").pp("layers").pp(i), c))
                .collect::<Result<_>>()?,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), h, c.layer_norm_eps)?,
            cfg: c.clone(),
        })
    }

    /// Mixed precision (`train.precision = "bf16"`, as LAVIS runs its frozen ViT in half
    /// precision): every block's products in `dtype`, its LayerNorms and residual stream in
    /// float32 (the float32 weights cast where a product uses them).
    pub fn set_compute(&mut self, dtype: DType) {
        for l in &mut self.layers {
            l.compute = Some(dtype);
        }
    }

    /// `last_hidden_state` after `post_layernorm`: `[B, 1 + grid², hidden]`, the features the
    /// Q-Former cross-attends to.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.post_norm(&self.hidden_states(pixels)?)
    }

    /// `post_layernorm` over every token of `hidden`.
    pub fn post_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(hidden)
    }

    /// `last_hidden_state` before `post_layernorm`.
    pub fn hidden_states(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hgt, wid) = pixels.dims4()?;
        let (size, p) = (self.cfg.image_size, self.cfg.patch_size);
        if c != 3 || hgt != size || wid != size {
            candle_core::bail!("pixel tensor is [{b}, {c}, {hgt}, {wid}], the vision tower takes [B, 3, {size}, {size}]");
        }
        let patches = crate::nn::patch::embed_patches(pixels, &self.patch_weight, p)?
            .broadcast_add(&self.patch_bias)?;
        let cls = self.class_embedding.repeat((b, 1, 1))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }
}
