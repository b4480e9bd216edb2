//! BERT (Devlin et al. 2019), the encoder of transformers' `BertModel` (modeling_bert.py):
//! word + position + token-type embeddings with LayerNorm, post-LN layers, optional tanh pooler.
//! Loads HF checkpoints by HF names (with or without the `bert.` prefix of the task heads), e.g.
//! the real pretrained MiniLM-L6 of sentence-transformers' all-MiniLM-L6-v2.

pub mod config;
pub mod layers;

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Embedding, Module, VarBuilder};

pub use config::BertConfig;
use layers::{FeedForward, PostLnAttention};

use crate::error::Error;
use crate::io::Weights;
use crate::nn::{linear, mask, LayerNorm, Linear};

/// `encoder.layer.{i}`: self-attention then feed-forward, each post-LN.
#[derive(Clone, Debug)]
struct BertLayer {
    attention: PostLnAttention,
    ffn: FeedForward,
}

impl BertLayer {
    fn new(vb: VarBuilder, c: &BertConfig) -> Result<Self> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            attention: PostLnAttention::new(
                vb.pp("attention").pp("self"),
                vb.pp("attention").pp("output"),
                h,
                h,
                c.num_attention_heads,
                eps,
            )?,
            ffn: FeedForward::new(
                vb.pp("intermediate"),
                vb.pp("output"),
                h,
                c.intermediate_size,
                c.hidden_act,
                eps,
            )?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    pooler: Option<Linear>,
    cfg: BertConfig,
}

impl Bert {
    /// `vb` points at the `BertModel` root (`embeddings.*`, `encoder.*`, `pooler.*`).
    pub fn new(vb: VarBuilder, cfg: &BertConfig, with_pooler: bool) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let words = emb.get_with_hints((cfg.vocab_size, h), "word_embeddings.weight", init)?;
        Ok(Self {
            word_embeddings: Embedding::new(words, h),
            position_embeddings: emb.get_with_hints(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
                init,
            )?,
            token_type_embeddings: emb.get_with_hints(
                (cfg.type_vocab_size, h),
                "token_type_embeddings.weight",
                init,
            )?,
            embeddings_norm: LayerNorm::new(emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::new(vb.pp("encoder").pp("layer").pp(i), cfg))
                .collect::<Result<_>>()?,
            pooler: if with_pooler {
                Some(linear(h, h, vb.pp("pooler").pp("dense"))?)
            } else {
                None
            },
            cfg: cfg.clone(),
        })
    }

    /// Loads a model directory (`config.json` + safetensors) as `BertModel` stores it, or a task
    /// model (`BertForMaskedLM`, ...) whose encoder sits under `bert.`; task heads are ignored.
    pub fn load(dir: &Path, device: &Device) -> crate::error::Result<Self> {
        let md = crate::models::ModelDir::open(dir)?;
        let cfg = md.bert("loading a BERT encoder")?.clone();
        let w = Weights::open(dir)?;
        let names = w.names();
        let prefixed = !names
            .iter()
            .any(|n| n == "embeddings.word_embeddings.weight")
            && names
                .iter()
                .any(|n| n == "bert.embeddings.word_embeddings.weight");
        let root = if prefixed { "bert." } else { "" };
        let pooler = names
            .iter()
            .any(|n| n == &format!("{root}pooler.dense.weight"));
        let vb = w.var_builder(DType::F32, device);
        let vb = if prefixed { vb.pp("bert") } else { vb };
        let model = Self::new(vb, &cfg, pooler).map_err(|e| Error::weights(dir, e.to_string()))?;
        // Non-persistent buffers older checkpoints carry, and the heads of task models.
        let ignored: Vec<String> = names
            .iter()
            .filter(|n| prefixed && !n.starts_with("bert."))
            .cloned()
            .collect();
        let mut suffixes: Vec<&str> = vec!["position_ids", "token_type_ids"];
        suffixes.extend(ignored.iter().map(String::as_str));
        w.check_all_used(&suffixes)?;
        Ok(model)
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// `last_hidden_state` `[B, T, H]` for `ids` `[B, T]` (u32), optional `token_type_ids`
    /// (zeros when `None`, as HF) and the 0/1 attention mask rows.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens exceeds max_position_embeddings ({})",
                self.cfg.max_position_embeddings
            );
        }
        let types = match token_type_ids {
            Some(tt) => tt.clone(),
            None => Tensor::zeros((b, t), DType::U32, ids.device())?,
        };
        let tt_emb = Embedding::new(self.token_type_embeddings.clone(), self.cfg.hidden_size);
        let x = self
            .word_embeddings
            .forward(ids)?
            .add(&tt_emb.forward(&types)?)?
            .broadcast_add(&self.position_embeddings.narrow(0, 0, t)?.unsqueeze(0)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;
        let m = mask::padding(attention_mask, ids.device())?;
        for layer in &self.layers {
            let a = layer.attention.forward(&x, None, Some(&m))?;
            x = layer.ffn.forward(&a)?;
        }
        Ok(x)
    }

    /// `pooler_output`: tanh(dense(h[:, 0])), when the checkpoint has a pooler.
    pub fn pool(&self, last_hidden: &Tensor) -> Result<Option<Tensor>> {
        match &self.pooler {
            Some(p) => Ok(Some(
                p.forward(&last_hidden.narrow(1, 0, 1)?.squeeze(1)?)?
                    .tanh()?,
            )),
            None => Ok(None),
        }
    }
}

/// sentence-transformers' mean pooling: the mean of `last_hidden` over positions whose mask is 1
/// (denominator clamped at 1e-9), then L2 normalisation (all-MiniLM-L6-v2's `Normalize` module).
pub fn mean_pool_normalized(last_hidden: &Tensor, attention_mask: &[Vec<u32>]) -> Result<Tensor> {
    let (b, t, _) = last_hidden.dims3()?;
    let m: Vec<f32> = attention_mask
        .iter()
        .flat_map(|r| r.iter().map(|&x| x as f32))
        .collect();
    let m = Tensor::from_vec(m, (b, t, 1), last_hidden.device())?;
    let summed = last_hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f32::MAX as f64)?;
    let mean = summed.broadcast_div(&count)?;
    let norm = mean
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    mean.broadcast_div(&norm)
}
