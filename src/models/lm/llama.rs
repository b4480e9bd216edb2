//! The Llama family (Touvron et al. 2023), transformers' `LlamaForCausalLM` (modeling_llama.py)
//! and `Qwen2ForCausalLM` (q/k/v biases): pre-RMSNorm layers, rotary position embeddings
//! (Su et al. 2021, the half-split "rotate_half" layout), grouped-query attention and a SwiGLU
//! feed-forward, with a tied or untied head. SmolLM2-135M, the demo's frozen LM, is one.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Module, VarBuilder};

use super::{attend, proj, split_heads, KvCache, LlamaConfig, StepContext, TokenIo};
use crate::nn::ops::needs_grad;
use crate::nn::Linear;

/// `y = x / sqrt(mean(x²) + eps) · weight` (transformers' `LlamaRMSNorm`, statistics in f32).
#[derive(Clone, Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A bfloat16 LM's weight, applied to its float32 residual stream.
        let weight = self.weight.to_dtype(x.dtype())?;
        // candle's fused rms_norm has no backward: only where nothing needs a gradient.
        if !needs_grad(&[x, &weight]) && x.dtype() == DType::F32 {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &weight, self.eps as f32);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .broadcast_mul(&weight)
    }
}

/// `model.layers.{i}`.
#[derive(Clone, Debug)]
pub(super) struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl Layer {
    fn new(vb: VarBuilder, c: &LlamaConfig) -> Result<Self> {
        let (w, hd) = (c.hidden_size, c.head_dim());
        let (qb, ob, mb) = (c.qkv_bias(), c.o_bias(), c.mlp_bias);
        let att = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            q_proj: proj(att.pp("q_proj"), w, c.num_attention_heads * hd, qb)?,
            k_proj: proj(att.pp("k_proj"), w, c.kv_heads() * hd, qb)?,
            v_proj: proj(att.pp("v_proj"), w, c.kv_heads() * hd, qb)?,
            o_proj: proj(att.pp("o_proj"), c.num_attention_heads * hd, w, ob)?,
            gate_proj: proj(mlp.pp("gate_proj"), w, c.intermediate_size, mb)?,
            up_proj: proj(mlp.pp("up_proj"), w, c.intermediate_size, mb)?,
            down_proj: proj(mlp.pp("down_proj"), c.intermediate_size, w, mb)?,
            input_layernorm: RmsNorm::new(vb.pp("input_layernorm"), w, c.rms_norm_eps)?,
            post_attention_layernorm: RmsNorm::new(
                vb.pp("post_attention_layernorm"),
                w,
                c.rms_norm_eps,
            )?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Llama {
    pub(super) io: TokenIo,
    pub(super) layers: Vec<Layer>,
    norm: RmsNorm,
    cfg: LlamaConfig,
    /// The weights' float type: the layers' products run in it (bfloat16 for mixed precision),
    /// the residual stream and the norms in float32.
    dtype: DType,
}

impl Llama {
    /// `vb` at the root of a `LlamaForCausalLM` checkpoint (`model.*`, `lm_head.weight`).
    pub fn new(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let m = vb.pp("model");
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let emb = m.get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "embed_tokens.weight",
            init,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            io: TokenIo::new(emb, cfg.tie_word_embeddings, vb.pp("lm_head"))?,
            layers,
            norm: RmsNorm::new(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// `cos` and `sin` `[B, 1, T, d]` of each position (transformers' `LlamaRotaryEmbedding`:
    /// inverse frequencies θ^(−2i/d) in f32, the two halves repeated).
    fn rotary(&self, positions: &[Vec<Option<u32>>], device: &Device) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim();
        let theta = self.cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let (b, t) = (positions.len(), positions.first().map_or(0, Vec::len));
        let (mut cos, mut sin) = (Vec::with_capacity(b * t * d), Vec::with_capacity(b * t * d));
        for row in positions {
            for p in row {
                // transformers gives a padding position the index 1; nothing reads it.
                let p = p.unwrap_or(1) as f32;
                for _ in 0..2 {
                    cos.extend(inv.iter().map(|f| (f * p).cos()));
                    sin.extend(inv.iter().map(|f| (f * p).sin()));
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, 1, t, d), device)?,
            Tensor::from_vec(sin, (b, 1, t, d), device)?,
        ))
    }

    /// See [`super::CausalLm::forward`].
    pub fn forward(
        &self,
        embeds: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let ctx = StepContext::new(cache, mask, c.max_position_embeddings, embeds.device())?;
        let (cos, sin) = self.rotary(&ctx.positions, embeds.device())?;
        let (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        let rope = |x: &Tensor| -> Result<Tensor> {
            let half = x.dim(D::Minus1)? / 2;
            let rotated = Tensor::cat(
                &[
                    &x.narrow(D::Minus1, half, half)?.neg()?,
                    &x.narrow(D::Minus1, 0, half)?,
                ],
                D::Minus1,
            )?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        };
        let scale = (c.head_dim() as f64).powf(-0.5);
        // The residual stream in float32; each block's products in the weights' type.
        let mut h = embeds.to_dtype(DType::F32)?;
        let dt = self.dtype;
        for (i, l) in self.layers.iter().enumerate() {
            let x = l.input_layernorm.forward(&h)?.to_dtype(dt)?;
            let q = rope(&split_heads(&l.q_proj.forward(&x)?, c.num_attention_heads)?)?;
            let k = rope(&split_heads(&l.k_proj.forward(&x)?, c.kv_heads())?)?;
            let v = split_heads(&l.v_proj.forward(&x)?, c.kv_heads())?;
            let (k, v) = cache.append(i, k, v)?;
            let a = attend(&q, &k, &v, &ctx.mask, scale)?;
            h = (h + l.o_proj.forward(&a)?.to_dtype(DType::F32)?)?;
            let x = l.post_attention_layernorm.forward(&h)?.to_dtype(dt)?;
            let gate = c.hidden_act.forward(&l.gate_proj.forward(&x)?)?;
            let f = l.down_proj.forward(&(gate * l.up_proj.forward(&x)?)?)?;
            h = (h + f.to_dtype(DType::F32)?)?;
        }
        self.norm.forward(&h)
    }
}
