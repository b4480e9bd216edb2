//! One Q-Former layer (transformers' `Blip2QFormerLayer`; LAVIS `Qformer.py` `BertLayer`;
//! BLIP-2 §3.1): self-attention over `[queries; text]` under the objective's mask; in every
//! `cross_attention_frequency`-th layer the query positions alone cross-attend to the image
//! features; then query positions take `intermediate_query`/`output_query` and text positions
//! take `intermediate`/`output`. All blocks are post-LN as in BERT.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::QformerConfig;
use crate::models::bert::layers::{FeedForward, PostLnAttention};

#[derive(Clone, Debug)]
pub struct QformerLayer {
    attention: PostLnAttention,
    crossattention: Option<PostLnAttention>,
    /// Absent without `use_qformer_text_input` (BLIP-2 stage 2 reads queries only).
    ffn_text: Option<FeedForward>,
    ffn_query: FeedForward,
}

impl QformerLayer {
    /// `vb` points at `qformer.encoder.layer.{index}`.
    pub fn new(vb: VarBuilder, c: &QformerConfig, index: usize) -> Result<Self> {
        let (h, eps, heads) = (c.hidden_size, c.layer_norm_eps, c.num_attention_heads);
        let block = |name: &str, kv: usize| {
            PostLnAttention::new(
                vb.pp(name).pp("attention"),
                vb.pp(name).pp("output"),
                h,
                kv,
                heads,
                eps,
            )
        };
        let ffn = |inter: &str, out: &str| {
            FeedForward::new(
                vb.pp(inter),
                vb.pp(out),
                h,
                c.intermediate_size,
                c.hidden_act,
                eps,
            )
        };
        Ok(Self {
            attention: block("attention", h)?,
            crossattention: if c.has_cross_attention(index) {
                Some(block("crossattention", c.encoder_hidden_size)?)
            } else {
                None
            },
            ffn_text: if c.use_qformer_text_input {
                Some(ffn("intermediate", "output")?)
            } else {
                None
            },
            ffn_query: ffn("intermediate_query", "output_query")?,
        })
    }

    /// Mixed precision (`train.precision = "bf16"`): every block's products in `dtype`, their
    /// residual additions and LayerNorms in the input's type.
    pub fn set_compute(&mut self, dtype: candle_core::DType) {
        self.attention.set_compute(dtype);
        if let Some(c) = &mut self.crossattention {
            c.set_compute(dtype);
        }
        if let Some(f) = &mut self.ffn_text {
            f.set_compute(dtype);
        }
        self.ffn_query.set_compute(dtype);
    }

    /// `x`: `[B, Q+T, H]` whose first `queries` positions are query tokens; `mask` additive,
    /// broadcasting to `[B, heads, Q+T, Q+T]`; `image`: `[B, N, E]` (needed when `queries > 0`
    /// and this layer cross-attends).
    pub fn forward(
        &self,
        x: &Tensor,
        queries: usize,
        mask: Option<&Tensor>,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let a = self.attention.forward(x, None, mask)?;
        let ffn_text = || {
            self.ffn_text.as_ref().ok_or_else(|| {
                candle_core::Error::Msg(
                    "this Q-Former has no text feed-forward (use_qformer_text_input is false)"
                        .into(),
                )
            })
        };
        if queries == 0 {
            return ffn_text()?.forward(&a);
        }
        let len = a.dim(1)?;
        let mut q = a.narrow(1, 0, queries)?;
        if let Some(cross) = &self.crossattention {
            let image = image.ok_or_else(|| {
                candle_core::Error::Msg("the Q-Former's queries need image features".into())
            })?;
            q = cross.forward(&q, Some(image), None)?;
        }
        let q = self.ffn_query.forward(&q)?;
        if len == queries {
            return Ok(q);
        }
        let t = ffn_text()?.forward(&a.narrow(1, queries, len - queries)?)?;
        Tensor::cat(&[&q, &t], 1)
    }
}
