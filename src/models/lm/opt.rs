//! OPT (Zhang et al. 2022), transformers' `OPTForCausalLM` (modeling_opt.py), the LM of BLIP-2's
//! `blip2-opt-*` checkpoints: learned positions offset by 2 and counted over the attention mask,
//! pre-LN layers (post-LN with no final norm when `do_layer_norm_before` is false, as opt-350m,
//! which also projects its narrower token embeddings in and out), a ReLU feed-forward and a
//! head tied to the token embeddings.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};

use super::{attend, proj, split_heads, KvCache, OptConfig, StepContext, TokenIo};
use crate::nn::{linear_no_bias, LayerNorm, Linear};

/// OPT's learned position table has two extra rows in front (fairseq's padding offset).
const POSITION_OFFSET: u32 = 2;
const LAYER_NORM_EPS: f64 = 1e-5;

/// `model.decoder.layers.{i}`.
#[derive(Clone, Debug)]
pub(super) struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl Layer {
    fn new(vb: VarBuilder, c: &OptConfig) -> Result<Self> {
        let (w, b) = (c.hidden_size, c.enable_bias);
        let att = vb.pp("self_attn");
        Ok(Self {
            q_proj: proj(att.pp("q_proj"), w, w, b)?,
            k_proj: proj(att.pp("k_proj"), w, w, b)?,
            v_proj: proj(att.pp("v_proj"), w, w, b)?,
            out_proj: proj(att.pp("out_proj"), w, w, b)?,
            self_attn_layer_norm: LayerNorm::new(vb.pp("self_attn_layer_norm"), w, LAYER_NORM_EPS)?,
            fc1: proj(vb.pp("fc1"), w, c.ffn_dim, b)?,
            fc2: proj(vb.pp("fc2"), c.ffn_dim, w, b)?,
            final_layer_norm: LayerNorm::new(vb.pp("final_layer_norm"), w, LAYER_NORM_EPS)?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Opt {
    pub(super) io: TokenIo,
    embed_positions: Embedding,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    pub(super) layers: Vec<Layer>,
    final_layer_norm: Option<LayerNorm>,
    cfg: OptConfig,
    /// The weights' float type: the layers' products run in it (bfloat16 for mixed precision),
    /// the residual stream and the LayerNorms in float32.
    dtype: DType,
}

impl Opt {
    /// `vb` at the root of an `OPTForCausalLM` checkpoint (`model.decoder.*`).
    pub fn new(vb: VarBuilder, cfg: &OptConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let d = vb.pp("model").pp("decoder");
        let (w, e) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let emb = d.get_with_hints((cfg.vocab_size, e), "embed_tokens.weight", init)?;
        let pos = d.get_with_hints(
            (cfg.max_position_embeddings + POSITION_OFFSET as usize, w),
            "embed_positions.weight",
            init,
        )?;
        let (project_in, project_out) = if e != w {
            (
                Some(linear_no_bias(e, w, d.pp("project_in"))?),
                Some(linear_no_bias(w, e, d.pp("project_out"))?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = (cfg.do_layer_norm_before && !cfg.remove_final_layer_norm)
            .then(|| LayerNorm::new(d.pp("final_layer_norm"), w, LAYER_NORM_EPS))
            .transpose()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(d.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            io: TokenIo::new(emb, cfg.tie_word_embeddings, vb.pp("lm_head"))?,
            embed_positions: Embedding::new(pos, w),
            project_in,
            project_out,
            layers,
            final_layer_norm,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// See [`super::CausalLm::forward`]. Hidden states come back at the embedding width (after
    /// `project_out`), where the head reads them.
    pub fn forward(
        &self,
        embeds: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let ctx = StepContext::new(cache, mask, c.max_position_embeddings, embeds.device())?;
        // transformers: (cumsum(mask) · mask − 1) + 2, so a padding position reads row 1.
        let idx: Vec<u32> = ctx
            .positions
            .iter()
            .flatten()
            .map(|p| p.map_or(1, |p| p + POSITION_OFFSET))
            .collect();
        let (b, t) = (ctx.positions.len(), idx.len() / ctx.positions.len().max(1));
        let idx = Tensor::from_vec(idx, (b, t), embeds.device())?;
        // The residual stream in float32; each block's products in the weights' type.
        let (dt, f32) = (self.dtype, DType::F32);
        let x = match &self.project_in {
            Some(p) => p.forward(&embeds.to_dtype(dt)?)?,
            None => embeds.clone(),
        };
        let mut h = (x.to_dtype(f32)? + self.embed_positions.forward(&idx)?.to_dtype(f32)?)?;
        let heads = c.num_attention_heads;
        let scale = ((c.hidden_size / heads) as f64).powf(-0.5);
        let pre = c.do_layer_norm_before;
        for (i, l) in self.layers.iter().enumerate() {
            let x = if pre {
                l.self_attn_layer_norm.forward(&h)?
            } else {
                h.clone()
            }
            .to_dtype(dt)?;
            let q = split_heads(&l.q_proj.forward(&x)?, heads)?;
            let k = split_heads(&l.k_proj.forward(&x)?, heads)?;
            let v = split_heads(&l.v_proj.forward(&x)?, heads)?;
            let (k, v) = cache.append(i, k, v)?;
            let a = l.out_proj.forward(&attend(&q, &k, &v, &ctx.mask, scale)?)?;
            h = (h + a.to_dtype(f32)?)?;
            if !pre {
                h = l.self_attn_layer_norm.forward(&h)?;
            }
            let x = if pre {
                l.final_layer_norm.forward(&h)?
            } else {
                h.clone()
            }
            .to_dtype(dt)?;
            let f = l
                .fc2
                .forward(&c.activation_function.forward(&l.fc1.forward(&x)?)?)?;
            h = (h + f.to_dtype(f32)?)?;
            if !pre {
                h = l.final_layer_norm.forward(&h)?;
            }
        }
        if let Some(n) = &self.final_layer_norm {
            h = n.forward(&h)?;
        }
        match &self.project_out {
            Some(p) => p.forward(&h.to_dtype(dt)?)?.to_dtype(f32),
            None => Ok(h),
        }
    }
}
