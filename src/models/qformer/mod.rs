//! The BLIP-2 Q-Former (Li et al. 2023, §3.1) with its stage-1 heads, laid out as transformers'
//! `Blip2ForImageTextRetrieval` (modeling_blip_2.py; `use_qformer_text_input` true):
//! `query_tokens`, `embeddings.{word,position}_embeddings`, `qformer.layernorm`,
//! `qformer.encoder.layer.*`, `vision_projection`, `text_projection`, `itm_head` and the frozen
//! image encoder under `vision_model`. Beyond HF, an optional ITG language-model head under
//! LAVIS's names (`cls.predictions.*`, decoder tied to the word embeddings), and a CLIP vision
//! tower in place of `Blip2VisionModel` (see config.rs).

pub mod clip_tower;
pub mod config;
pub mod from_bert;
pub mod layer;
pub mod vision;

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};

pub use config::{Blip2Config, QformerConfig, VisionConfig};
use layer::QformerLayer;
use vision::Blip2Vision;

use crate::io::Weights;
use crate::models::clip::vision::{normal, ClipVision};
use crate::nn::mask::{self, QformerMode};
use crate::nn::{linear, ops::l2_normalize, LayerNorm, Linear};

/// The frozen image encoder whose features the queries cross-attend to.
#[derive(Clone, Debug)]
pub enum ImageEncoder {
    Blip2(Blip2Vision),
    /// A CLIP tower, every layer of it used, `post_layernorm` over all tokens.
    Clip(ClipVision),
}

impl ImageEncoder {
    /// `[B, N, E]`: every token (class token first) after the final LayerNorm.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.post_norm(&self.hidden_states(pixels)?)
    }

    /// Every token before the final LayerNorm (BLIP-2's `ln_vision`, which stage 1 trains): the
    /// frozen part of [`ImageEncoder::forward`].
    pub fn hidden_states(&self, pixels: &Tensor) -> Result<Tensor> {
        match self {
            ImageEncoder::Blip2(v) => v.hidden_states(pixels),
            ImageEncoder::Clip(v) => v.hidden_states(pixels, None),
        }
    }

    /// Mixed precision: the frozen tower's layers compute their products in `dtype`.
    pub fn set_compute(&mut self, dtype: candle_core::DType) {
        match self {
            ImageEncoder::Blip2(v) => v.set_compute(dtype),
            ImageEncoder::Clip(v) => v.encoder_mut().set_compute(dtype),
        }
    }

    /// The final LayerNorm over every token of `hidden`.
    pub fn post_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        match self {
            ImageEncoder::Blip2(v) => v.post_norm(hidden),
            ImageEncoder::Clip(v) => v.post_norm(hidden),
        }
    }
}

/// BERT's `BertLMPredictionHead` as LAVIS's Q-Former uses it for ITG: dense, activation,
/// LayerNorm, then the word embeddings (tied) plus a bias.
#[derive(Clone, Debug)]
struct LmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    bias: Tensor,
}

/// Stage 1's text branch and heads (`Blip2ForImageTextRetrieval`): the text embeddings, the
/// ITC projections, the ITM head and the optional ITG head. Stage 2
/// (`Blip2ForConditionalGeneration`) has none of them: its Q-Former reads queries only.
#[derive(Clone, Debug)]
struct Stage1 {
    word_embeddings: Embedding,
    position_embeddings: Tensor,
    vision_projection: Linear,
    text_projection: Linear,
    itm_head: Linear,
    lm_head: Option<LmHead>,
}

/// Which parts a Q-Former checkpoint holds besides the queries, layers and image encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heads {
    /// Stage 1 (text branch, ITC/ITM heads), with the ITG head when `lm_head`.
    Stage1 { lm_head: bool },
    /// Stage 2: queries only.
    QueriesOnly,
}

#[derive(Clone, Debug)]
pub struct Blip2Qformer {
    pub vision: ImageEncoder,
    /// The learned queries (BLIP-2 §3.1), `[1, Q, H]`.
    query_tokens: Tensor,
    layernorm: LayerNorm,
    layers: Vec<QformerLayer>,
    stage1: Option<Stage1>,
    cfg: Blip2Config,
}

impl Blip2Qformer {
    /// `vb` points at the checkpoint root; `heads` says which heads it holds.
    pub fn new(vb: VarBuilder, cfg: &Blip2Config, heads: Heads) -> Result<Self> {
        let q = &cfg.qformer;
        let h = q.hidden_size;
        let vision = match &cfg.vision {
            VisionConfig::Blip2(c) => {
                ImageEncoder::Blip2(Blip2Vision::new(vb.pp("vision_model"), c)?)
            }
            VisionConfig::Clip(c) => ImageEncoder::Clip(ClipVision::new(vb.pp("vision_model"), c)?),
        };
        let qf = vb.pp("qformer");
        let stage1 = match heads {
            Heads::Stage1 { lm_head } => Some(Self::stage1(&vb, cfg, lm_head)?),
            Heads::QueriesOnly => None,
        };
        Ok(Self {
            vision,
            query_tokens: vb.get_with_hints(
                (1, cfg.num_query_tokens, h),
                "query_tokens",
                normal(0.02),
            )?,
            layernorm: LayerNorm::new(qf.pp("layernorm"), h, q.layer_norm_eps)?,
            layers: (0..q.num_hidden_layers)
                .map(|i| QformerLayer::new(qf.pp("encoder").pp("layer").pp(i), q, i))
                .collect::<Result<_>>()?,
            stage1,
            cfg: cfg.clone(),
        })
    }

    fn stage1(vb: &VarBuilder, cfg: &Blip2Config, with_lm_head: bool) -> Result<Stage1> {
        let q = &cfg.qformer;
        let h = q.hidden_size;
        let emb = vb.pp("embeddings");
        let words =
            emb.get_with_hints((q.vocab_size, h), "word_embeddings.weight", normal(0.02))?;
        let lm_head = if with_lm_head {
            let p = vb.pp("cls").pp("predictions");
            Some(LmHead {
                dense: linear(h, h, p.pp("transform").pp("dense"))?,
                layer_norm: LayerNorm::new(p.pp("transform").pp("LayerNorm"), h, q.layer_norm_eps)?,
                bias: p.get_with_hints(q.vocab_size, "bias", candle_nn::Init::Const(0.0))?,
            })
        } else {
            None
        };
        Ok(Stage1 {
            word_embeddings: Embedding::new(words, h),
            position_embeddings: emb.get_with_hints(
                (q.max_position_embeddings, h),
                "position_embeddings.weight",
                normal(0.02),
            )?,
            vision_projection: linear(h, cfg.image_text_hidden_size, vb.pp("vision_projection"))?,
            text_projection: linear(h, cfg.image_text_hidden_size, vb.pp("text_projection"))?,
            itm_head: linear(h, 2, vb.pp("itm_head"))?,
            lm_head,
        })
    }

    /// The stage-1 text branch and heads, or an error for a stage-2 (queries-only) Q-Former.
    fn text_branch(&self) -> Result<&Stage1> {
        self.stage1.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "this Q-Former reads queries only (a BLIP-2 stage-2 model): it has no text \
                 embeddings or ITC/ITM heads"
                    .into(),
            )
        })
    }

    /// Loads a Q-Former model directory (`Blip2Config` + safetensors).
    pub fn load(dir: &Path, device: &Device) -> crate::error::Result<Self> {
        let md = crate::models::ModelDir::open(dir)?;
        Self::load_weights(dir, md.qformer("loading a Q-Former")?, device)
    }

    /// Builds the model of `cfg` from the safetensors of `dir`, with the ITG head when they hold
    /// one; every stored tensor must be used (LAVIS's `temp` aside).
    pub fn load_weights(
        dir: &Path,
        cfg: &Blip2Config,
        device: &Device,
    ) -> crate::error::Result<Self> {
        let w = Weights::open(dir)?;
        let lm = w.names().iter().any(|n| n == "cls.predictions.bias");
        w.build(DType::F32, device, &["position_ids", "temp"], |vb| {
            Self::new(vb, cfg, Heads::Stage1 { lm_head: lm })
        })
    }

    /// Mixed precision (`train.precision = "bf16"`): the layers' products in `dtype`
    /// (`QformerLayer::set_compute`), and the frozen image encoder's (as LAVIS runs its frozen
    /// ViT in half precision); embeddings, LayerNorms (`ln_vision` too), heads and projections
    /// stay float32.
    pub fn set_compute(&mut self, dtype: candle_core::DType) {
        for l in &mut self.layers {
            l.set_compute(dtype);
        }
        self.vision.set_compute(dtype);
    }

    pub fn config(&self) -> &Blip2Config {
        &self.cfg
    }

    pub fn num_queries(&self) -> usize {
        self.cfg.num_query_tokens
    }

    pub fn has_lm_head(&self) -> bool {
        self.stage1.as_ref().is_some_and(|s| s.lm_head.is_some())
    }

    /// The image features `[B, N, E]` the queries read: the frozen tower's, then `ln_vision`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixels)
    }

    /// The frozen tower's features before `ln_vision` (which stage 1 trains).
    pub fn image_hidden(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.hidden_states(pixels)
    }

    /// `ln_vision` over `hidden` (from [`Blip2Qformer::image_hidden`]).
    pub fn ln_vision(&self, hidden: &Tensor) -> Result<Tensor> {
        self.vision.post_norm(hidden)
    }

    /// Runs the Q-Former over `[queries; text]`: queries when `batch_queries` is `Some(B)`, text
    /// when `ids` is given (positions count from 0 at the first text token; queries have none).
    /// `mask` is additive; `image` feeds the cross-attention of the query positions.
    pub fn encode(
        &self,
        batch_queries: Option<usize>,
        ids: Option<&Tensor>,
        mask: Option<&Tensor>,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut parts = Vec::new();
        if let Some(b) = batch_queries {
            let (_, q, h) = self.query_tokens.dims3()?;
            parts.push(self.query_tokens.broadcast_as((b, q, h))?.contiguous()?);
        }
        if let Some(ids) = ids {
            let t = ids.dim(1)?;
            if t > self.cfg.qformer.max_position_embeddings {
                candle_core::bail!(
                    "text of {t} tokens exceeds the Q-Former's max_position_embeddings ({})",
                    self.cfg.qformer.max_position_embeddings
                );
            }
            let text = self.text_branch()?;
            let pos = text.position_embeddings.narrow(0, 0, t)?.unsqueeze(0)?;
            parts.push(text.word_embeddings.forward(ids)?.broadcast_add(&pos)?);
        }
        let queries = batch_queries.map_or(0, |_| self.cfg.num_query_tokens);
        let mut x = self.layernorm.forward(&Tensor::cat(&parts, 1)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, queries, mask, image)?;
        }
        Ok(x)
    }

    /// ITC, image side: the query outputs over `image` `[B, Q, H]` (queries see only queries).
    pub fn query_output(&self, image: &Tensor) -> Result<Tensor> {
        self.encode(Some(image.dim(0)?), None, None, Some(image))
    }

    /// ITC, text side: the text alone, `[B, T, H]`, padding masked.
    pub fn text_output(&self, ids: &Tensor, attention_mask: &[Vec<u32>]) -> Result<Tensor> {
        let m = mask::padding(attention_mask, ids.device())?;
        self.encode(None, Some(ids), Some(&m), None)
    }

    /// `normalize(vision_projection(query_output))`: `[B, Q, D]`.
    pub fn itc_image_features(&self, query_output: &Tensor) -> Result<Tensor> {
        l2_normalize(
            &self
                .text_branch()?
                .vision_projection
                .forward(query_output)?,
        )
    }

    /// `normalize(text_projection(text_output[:, 0]))`, the [CLS] feature: `[B, D]`.
    pub fn itc_text_features(&self, text_output: &Tensor) -> Result<Tensor> {
        let cls = text_output.narrow(1, 0, 1)?.squeeze(1)?;
        l2_normalize(&self.text_branch()?.text_projection.forward(&cls)?)
    }

    /// Joint pass over `[queries; text]` of paired rows under `mode`'s mask: `[B, Q+T, H]`.
    pub fn multimodal(
        &self,
        mode: QformerMode,
        image: &Tensor,
        ids: &Tensor,
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor> {
        let b = ids.dim(0)?;
        if image.dim(0)? != b {
            candle_core::bail!(
                "{} images for {b} texts: ITM/ITG rows are pairs",
                image.dim(0)?
            );
        }
        let m = mask::qformer(
            mode,
            self.cfg.num_query_tokens,
            attention_mask,
            ids.device(),
        )?;
        self.encode(Some(b), Some(ids), Some(&m), Some(image))
    }

    /// ITM logits `[B, 2]` (index 1 = match): `itm_head` on every query output of the
    /// bidirectional pass, averaged over the queries.
    pub fn itm_logits(
        &self,
        image: &Tensor,
        ids: &Tensor,
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor> {
        let h = self.multimodal(QformerMode::Itm, image, ids, attention_mask)?;
        self.itm_head_mean(&h)
    }

    /// `itm_head` averaged over the query positions of a multimodal output.
    pub fn itm_head_mean(&self, multimodal: &Tensor) -> Result<Tensor> {
        let q = multimodal.narrow(1, 0, self.cfg.num_query_tokens)?;
        self.text_branch()?.itm_head.forward(&q)?.mean(1)
    }

    /// ITG logits `[B, T, V]` over the text positions of the multimodal causal pass (`ids` start
    /// with [DEC]); position i predicts token i + 1.
    pub fn itg_logits(
        &self,
        image: &Tensor,
        ids: &Tensor,
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor> {
        let h = self.multimodal(QformerMode::Itg, image, ids, attention_mask)?;
        let q = self.cfg.num_query_tokens;
        let text = h.narrow(1, q, h.dim(1)? - q)?;
        self.lm_logits(&text)
    }

    /// The ITG head on text hidden states `[B, T, H]` → `[B, T, V]`.
    pub fn lm_logits(&self, text_hidden: &Tensor) -> Result<Tensor> {
        let text = self.text_branch()?;
        let head = text.lm_head.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "this model directory has no ITG head (cls.predictions.*)".into(),
            )
        })?;
        let x = self
            .cfg
            .qformer
            .hidden_act
            .forward(&head.dense.forward(text_hidden)?)?;
        let x = head.layer_norm.forward(&x)?;
        x.broadcast_matmul(&text.word_embeddings.embeddings().t()?)?
            .broadcast_add(&head.bias)
    }
}
