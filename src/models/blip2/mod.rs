//! BLIP-2 stage 2 (Li et al. 2023, §3.3, Fig. 3), transformers' `Blip2ForConditionalGeneration`
//! (modeling_blip_2.py): the frozen image encoder and the Q-Former (queries only) give
//! `[B, Q, H]` query outputs; `language_projection`, a fully connected layer, maps them to the
//! frozen LM's input width, and they enter the LM as soft visual prompts in front of the text.
//! Names: `vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`,
//! `language_model.*` (or an external LM, see config.rs).

pub mod config;

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Module, VarBuilder};

pub use config::Blip2LmConfig;

use crate::io::Weights;
use crate::models::lm::{CausalLm, LmConfig};
use crate::models::qformer::{Blip2Qformer, Heads};
use crate::nn::{linear, Linear};

/// Marks a query slot in a legacy-layout id row (no `<image>` token in the vocabulary).
pub const QUERY_SLOT: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub struct Blip2Lm {
    pub qformer: Blip2Qformer,
    /// BLIP-2's fully connected bridge, Q-Former width → LM input width.
    pub language_projection: Linear,
    pub lm: CausalLm,
    cfg: Blip2LmConfig,
}

impl Blip2Lm {
    /// `vb` at the checkpoint root; the LM from `language_model.*` unless `lm` is given.
    pub fn new(vb: VarBuilder, cfg: &Blip2LmConfig, lm: Option<CausalLm>) -> Result<Self> {
        let qformer = Blip2Qformer::new(vb.clone(), &cfg.blip2, Heads::QueriesOnly)?;
        let language_projection = linear(
            cfg.blip2.qformer.hidden_size,
            cfg.text.embed_width(),
            vb.pp("language_projection"),
        )?;
        let lm = match lm {
            Some(lm) => lm,
            None => CausalLm::new(vb.pp("language_model"), &cfg.text)?,
        };
        Ok(Self {
            qformer,
            language_projection,
            lm,
            cfg: cfg.clone(),
        })
    }

    /// Loads a stage-2 model directory; the LM from its `language_model.*` tensors, or from the
    /// directory / GGUF file `vlalign_language_model` names (relative to `dir`).
    pub fn load(dir: &Path, device: &Device) -> crate::error::Result<Self> {
        Self::from_model_dir(&crate::models::ModelDir::open(dir)?, device)
    }

    /// [`Blip2Lm::load`] of an opened model directory.
    pub fn from_model_dir(
        md: &crate::models::ModelDir,
        device: &Device,
    ) -> crate::error::Result<Self> {
        let dir = md.path.as_path();
        let cfg = md.blip2_lm("loading a BLIP-2 model")?.clone();
        let external = match &cfg.language_model {
            Some(p) => {
                let path = dir.join(p);
                let (lm, lm_cfg) = CausalLm::load(&path, device)?;
                if lm_cfg.vocab_size() != cfg.text.vocab_size()
                    || lm_cfg.embed_width() != cfg.text.embed_width()
                {
                    return Err(crate::error::Error::config(
                        dir.join("config.json"),
                        format!(
                            "text_config (vocabulary {}, width {}) does not describe the language \
                             model at {} (vocabulary {}, width {})",
                            cfg.text.vocab_size(),
                            cfg.text.embed_width(),
                            path.display(),
                            lm_cfg.vocab_size(),
                            lm_cfg.embed_width()
                        ),
                    ));
                }
                Some(lm)
            }
            None => None,
        };
        let w = Weights::open(dir)?;
        let tied: &[&str] = if external.is_none() && cfg.text.tied() {
            &["language_model.lm_head.weight"]
        } else {
            &[]
        };
        w.build(DType::F32, device, tied, |vb| Self::new(vb, &cfg, external))
    }

    pub fn config(&self) -> &Blip2LmConfig {
        &self.cfg
    }

    pub fn lm_config(&self) -> &LmConfig {
        &self.cfg.text
    }

    pub fn num_queries(&self) -> usize {
        self.cfg.blip2.num_query_tokens
    }

    /// The soft visual prompts `[B, Q, W]`: `language_projection(qformer(queries, image))`.
    pub fn image_prefix(&self, pixels: &Tensor) -> Result<Tensor> {
        let image = self.qformer.image_embeds(pixels)?;
        self.project(&self.qformer.query_output(&image)?)
    }

    /// `language_projection` of query outputs `[B, Q, H]`.
    pub fn project(&self, query_output: &Tensor) -> Result<Tensor> {
        self.language_projection.forward(query_output)
    }

    /// The LM's input embeddings `[B, T, W]` for id rows `[B, T]` in which the `<image>` token
    /// (or [`QUERY_SLOT`]) marks where row b's query prompts go, in order (transformers'
    /// `masked_scatter`); each row must hold exactly `Q` of them. Differentiable in `prefix`.
    pub fn inputs_embeds(&self, prefix: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
        let (b, q, w) = prefix.dims3()?;
        let t = ids.first().map_or(0, Vec::len);
        if ids.len() != b {
            candle_core::bail!("{} id rows for {b} images", ids.len());
        }
        let is_query = |id: u32| id == QUERY_SLOT || Some(id) == self.cfg.image_token_index;
        let vocab = self.cfg.text.vocab_size() as u32;
        let mut tokens = Vec::with_capacity(b * t);
        let mut gather = Vec::with_capacity(b * t);
        for (r, row) in ids.iter().enumerate() {
            if row.len() != t {
                candle_core::bail!("id row {r} has {} entries, row 0 has {t}", row.len());
            }
            let mut k = 0;
            for (j, &id) in row.iter().enumerate() {
                if is_query(id) {
                    gather.push((b * t + r * q + k) as u32);
                    k += 1;
                    tokens.push(0);
                } else {
                    if id >= vocab {
                        candle_core::bail!("token id {id} is outside the vocabulary ({vocab})");
                    }
                    gather.push((r * t + j) as u32);
                    tokens.push(id);
                }
            }
            if k != q {
                candle_core::bail!("row {r} has {k} image slots for {q} queries");
            }
        }
        let device = prefix.device();
        let tok = Tensor::from_vec(tokens, (b, t), device)?;
        let table = Tensor::cat(
            &[
                &self.lm.embed(&tok)?.reshape((b * t, w))?,
                &prefix.reshape((b * q, w))?,
            ],
            0,
        )?;
        let idx = Tensor::from_vec(gather, b * t, device)?;
        table.index_select(&idx, 0)?.reshape((b, t, w))
    }

    /// The id row and mask of one prompt (`prompt_ids`, the tokenizer's output with its BOS)
    /// after `pad` left-padding positions: the `<image>` layout puts the Q placeholders first and
    /// the padding after them, as transformers' `Blip2Processor` does; the legacy layout pads
    /// first, then queries, then the prompt.
    pub fn layout(&self, prompt_ids: &[u32], pad: usize, pad_id: u32) -> (Vec<u32>, Vec<u32>) {
        let q = self.num_queries();
        let mut ids = Vec::with_capacity(q + pad + prompt_ids.len());
        let mut mask = Vec::with_capacity(ids.capacity());
        match self.cfg.image_token_index {
            Some(img) => {
                ids.extend(std::iter::repeat_n(img, q));
                mask.extend(std::iter::repeat_n(1, q));
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(0, pad));
            }
            None => {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(0, pad));
                ids.extend(std::iter::repeat_n(QUERY_SLOT, q));
                mask.extend(std::iter::repeat_n(1, q));
            }
        }
        ids.extend_from_slice(prompt_ids);
        mask.extend(std::iter::repeat_n(1, prompt_ids.len()));
        (ids, mask)
    }
}
