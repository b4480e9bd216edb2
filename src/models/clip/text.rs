//! CLIP's text tower (`CLIPTextTransformer` in transformers' modeling_clip.py; CLIP §2.4): token
//! and learned position embeddings, a causal transformer that also masks padding, and
//! `final_layer_norm`; the sequence is pooled at its end-of-text token.

use candle_core::{Device, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};

use super::config::ClipTextConfig;
use super::encoder::{Encoder, EncoderShape};
use super::vision::normal;
use crate::nn::attention::MASKED;
use crate::nn::LayerNorm;

#[derive(Clone, Debug)]
pub struct ClipText {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipText {
    /// `vb` points at `text_model`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let shape = EncoderShape {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            act: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        let tokens =
            emb.get_with_hints((cfg.vocab_size, h), "token_embedding.weight", normal(0.02))?;
        Ok(Self {
            token_embedding: Embedding::new(tokens, h),
            position_embedding: emb.get_with_hints(
                (cfg.max_position_embeddings, h),
                "position_embedding.weight",
                normal(0.01),
            )?,
            encoder: Encoder::new(vb.pp("encoder"), &shape)?,
            final_layer_norm: LayerNorm::new(vb.pp("final_layer_norm"), h, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The position each row of `ids` is pooled at, as transformers decides it from
    /// `eos_token_id`.
    pub fn pool_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.cfg.eos_token_id == 2 {
                    // Legacy configs: argmax of the ids (torch.argmax returns the first maximum).
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    // First EOS; with none, argmax over an all-zero row gives position 0.
                    row.iter()
                        .position(|&t| t == self.cfg.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect()
    }

    /// Checks a padded batch (`input_ids`, `attention_mask`: 1 = token, 0 = padding) fits this
    /// tower: ids below `vocab_size`, length within the context, rows of one length.
    pub fn check_batch(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<u32>],
    ) -> std::result::Result<(), String> {
        let t = seq_len(ids);
        if t == 0 || t > self.cfg.max_position_embeddings {
            return Err(format!(
                "token sequence length {t} is outside 1..={} (text_config.max_position_embeddings)",
                self.cfg.max_position_embeddings
            ));
        }
        if ids.len() != mask.len()
            || ids.iter().any(|r| r.len() != t)
            || mask.iter().any(|r| r.len() != t)
        {
            return Err("token batch rows have different lengths".into());
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(format!(
                "token id {bad} is out of range for text_config.vocab_size {}; \
                 the tokenizer does not belong to this model",
                self.cfg.vocab_size
            ));
        }
        Ok(())
    }

    /// Additive attention mask `[B, 1, T, T]`: position j is visible from i when j ≤ i and j is
    /// not padding (transformers' `create_causal_mask` with an attention mask).
    fn mask(&self, mask: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
        let (b, t) = (mask.len(), seq_len(mask));
        let mut m = vec![0f32; b * t * t];
        for (r, pad) in mask.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    if j > i || pad[j] == 0 {
                        m[(r * t + i) * t + j] = MASKED;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, t), dev)
    }

    /// `(last_hidden_state, pooled)` for a padded batch (`input_ids`, `attention_mask`).
    pub fn forward(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        self.check_batch(ids, mask)
            .map_err(candle_core::Error::Msg)?;
        let dev = self.position_embedding.device();
        let (b, t) = (ids.len(), seq_len(ids));
        let x = self
            .token_embedding
            .forward(&ids_tensor(ids, dev)?)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, t)?.unsqueeze(0)?)?;
        let mask = self.mask(mask, dev)?.to_dtype(x.dtype())?;
        let last =
            self.final_layer_norm
                .forward(&self.encoder.forward(&x, Some(&mask), None)?)?;
        let rows: Vec<u32> = self
            .pool_positions(ids)
            .into_iter()
            .enumerate()
            .map(|(r, p)| (r * t + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, dev)?;
        let pooled = last
            .reshape((b * t, self.cfg.hidden_size))?
            .index_select(&rows, 0)?;
        Ok((last, pooled))
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// The transformer, for its training modes (`Encoder::set_compute`, `set_checkpointing`).
    pub fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }
}

/// The length of the rows of a padded batch.
fn seq_len(rows: &[Vec<u32>]) -> usize {
    rows.first().map_or(0, Vec::len)
}

/// `[B, T]` u32 ids of a padded batch.
pub fn ids_tensor(ids: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (ids.len(), seq_len(ids)), dev)
}
