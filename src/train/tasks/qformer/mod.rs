//! BLIP-2 stage 1 as a training task (Li et al. 2023, §3.2; LAVIS `blip2_qformer.py`
//! `Blip2Qformer.forward`): a Q-Former learns, on the features of a frozen image encoder, three
//! objectives that share every weight — ITC, ITM with hard negatives drawn from the ITC
//! similarities, ITG — and the loss is their sum, each term logged. The image encoder is the
//! vision tower of a CLIP model directory, cut before its last `vision_drop_layers` layers
//! (`models::qformer::clip_tower`); `ln_vision` (`vision_model.post_layernorm`) is new and
//! trained, as in LAVIS. The step itself is in step.rs.

mod global;
mod step;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::data::batch::{Batch, CaptionTruth};
use crate::data::image::{processor_for_dir, ImageProcessor};
use crate::error::{Error, Result};
use crate::models::bert::BertConfig;
use crate::models::qformer::clip_tower::frozen_clip_vision;
use crate::models::qformer::config::{Blip2Config, QformerConfig, VisionConfig};
use crate::models::qformer::from_bert::{bert_config, qformer_from_bert};
use crate::models::qformer::{Blip2Qformer, Heads};
use crate::nn::Activation;
use crate::objectives::itc::{itc_loss, max_over_queries, TEMP_INIT, TEMP_MAX, TEMP_MIN};
use crate::objectives::itg::{decoder_ids, itg_loss};
use crate::objectives::itm::{itm_loss, sample_hard_negatives_excluding};
use crate::rng;
use crate::train::config::{QformerInit, QformerSpec, TrainConfig};
use crate::train::distill::Distillation;
use crate::train::optim::Grads;
use crate::train::task::{LossTerms, Task, TaskParts};
use crate::train::tokenizer::tokenizer_for;

/// The learned ITC temperature's tensor name (LAVIS's; not part of HF's layout).
pub const TEMP: &str = "temp";

pub struct QformerTask {
    pub parts: TaskParts,
    pub model: Blip2Qformer,
    pub config: Blip2Config,
    /// The [DEC] id that replaces [CLS] for ITG.
    pub dec_id: u32,
    temp: Var,
    seed: u64,
    /// Momentum distillation of ITC (`[distill]`), when the run uses it.
    distill: Option<Box<QformerDistill>>,
}

/// Momentum distillation for the Q-Former's ITC (ALBEF §3.3, as BLIP applies it to its ITC): a
/// momentum Q-Former (an EMA of every trained variable, over the same frozen image encoder) and
/// its state; its query and [CLS] features give the soft targets, and the queues hold them.
struct QformerDistill {
    state: Distillation,
    model: Blip2Qformer,
}

/// `(image i, text j) ↦ caption j is true of image i`, for the hard-negative draw: LAVIS keeps
/// pairs that share an `image_id` out of the negatives; a source that knows more says so through
/// [`CaptionTruth`] (shapes scenes know which captions are true of which scene, e.g. two
/// "a red circle" images). Samples without one match only their own caption.
fn caption_true_of<'a>(
    truths: &'a [&'a Option<Arc<dyn CaptionTruth>>],
) -> impl Fn(usize, usize) -> bool + 'a {
    move |i, j| match (truths.get(i), truths.get(j)) {
        (Some(Some(image)), Some(Some(text))) => image.caption_fits(text.as_ref()),
        _ => false,
    }
}

impl QformerTask {
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Self> {
        let spec: &QformerSpec = cfg
            .qformer
            .as_ref()
            .ok_or_else(|| Error::input("the config has no [qformer] section"))?;
        if let QformerInit::Bert(dir) = &spec.init {
            if !dir.join("config.json").is_file() {
                return Err(Error::input(format!(
                    "qformer.init = {:?}: use \"random\" or a BERT model directory (config.json + safetensors)",
                    dir.display().to_string()
                )));
            }
        }
        let dir = Path::new(&spec.vision_model);
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "qformer.vision_model {:?} is not a directory (train the CLIP first, e.g. `vlalign demo`)",
                spec.vision_model
            )));
        }
        let (vision, frozen) = frozen_clip_vision(dir, spec.vision_drop_layers, device)?;
        let processor = match processor_for_dir(dir)? {
            Some((p, _)) => p,
            None => ImageProcessor::clip_default(vision.image_size),
        };
        let (tokenizer, extra_files) = tokenizer_for(&spec.tokenizer, spec.max_text_len)?;
        // With a BERT to start from, its shape wins over the spec's; [DEC] is appended after the
        // larger of the two vocabularies (30522 for BERT's WordPiece, as LAVIS).
        let bert_vocab = match &spec.init {
            QformerInit::Random => 0,
            QformerInit::Bert(dir) => bert_config(dir)?.vocab_size,
        };
        let vocab = tokenizer.vocab_size().max(bert_vocab) + 1;
        let dec_id = (vocab - 1) as u32;
        let (shape, initial) = match &spec.init {
            QformerInit::Random => {
                let b = BertConfig {
                    vocab_size: vocab,
                    hidden_size: spec.hidden_size,
                    num_hidden_layers: spec.num_hidden_layers,
                    num_attention_heads: spec.num_attention_heads,
                    intermediate_size: spec.intermediate_size,
                    hidden_act: Activation::Gelu,
                    layer_norm_eps: 1e-12,
                    ..BertConfig::default()
                };
                (b, HashMap::new())
            }
            QformerInit::Bert(dir) => {
                qformer_from_bert(dir, vocab, spec.max_text_len, cfg.train.seed, device)?
            }
        };
        let config = Blip2Config {
            vision: VisionConfig::Clip(vision.clone()),
            qformer: QformerConfig {
                vocab_size: vocab,
                hidden_size: shape.hidden_size,
                num_hidden_layers: shape.num_hidden_layers,
                num_attention_heads: shape.num_attention_heads,
                intermediate_size: shape.intermediate_size,
                hidden_act: shape.hidden_act,
                max_position_embeddings: spec.max_text_len,
                layer_norm_eps: shape.layer_norm_eps,
                pad_token_id: tokenizer.pad_id(),
                cross_attention_frequency: spec.cross_attention_frequency,
                encoder_hidden_size: vision.hidden_size,
                use_qformer_text_input: true,
                bos_token_id: Some(dec_id),
            },
            num_query_tokens: spec.num_query_tokens,
            image_text_hidden_size: spec.embed_dim,
        };
        config.validate().map_err(Error::input)?;
        let varmap = VarMap::new();
        let vb = crate::nn::init::seeded_with(
            &varmap,
            cfg.train.seed,
            frozen.clone(),
            initial,
            DType::F32,
            device,
        );
        // The frozen tower stays in `frozen` too, to be saved with the model.
        let mut model = crate::nn::linear::keeping_layout(|| {
            Blip2Qformer::new(vb.clone(), &config, Heads::Stage1 { lm_head: true })
        })?;
        let compute = cfg.train.precision.compute_dtype();
        model.set_compute(compute);
        cfg.train.precision.warn_if_cpu(device);
        vb.get_with_hints((), TEMP, candle_nn::Init::Const(TEMP_INIT))?;
        let parts = TaskParts {
            varmap,
            frozen,
            processor,
            tokenizer,
            extra_files,
            device: device.clone(),
            comm: crate::dist::single(),
        };
        let temp = parts.var(TEMP).expect("temperature created");
        let distill = match &cfg.distill {
            Some(spec) => {
                // Image-side queue entries are `[queries, embed_dim]`.
                let entry = [config.num_query_tokens, config.image_text_hidden_size];
                let state = Distillation::new(
                    spec,
                    &parts.vars(),
                    &entry,
                    config.image_text_hidden_size,
                    cfg.train.seed,
                    device,
                )?;
                let vb = crate::nn::init::seeded_with_frozen(
                    &state.varmap,
                    cfg.train.seed,
                    parts.frozen.clone(),
                    DType::F32,
                    device,
                );
                let mut model = crate::nn::linear::keeping_layout(|| {
                    Blip2Qformer::new(vb, &config, Heads::Stage1 { lm_head: true })
                })?;
                model.set_compute(compute);
                if state.varmap.all_vars().len() != parts.vars().len() {
                    return Err(Error::input(
                        "the momentum Q-Former does not have the trained Q-Former's variables",
                    ));
                }
                Some(Box::new(QformerDistill { state, model }))
            }
            None => None,
        };
        Ok(Self {
            parts,
            model,
            config,
            dec_id,
            temp,
            seed: cfg.train.seed,
            distill,
        })
    }

    /// ITM's hard negatives `(text_for_image, image_for_text)` of step `step`: drawn (seeded by
    /// the run's seed and the step) from the softmax of the temperature-scaled ITC similarities
    /// of these features, never a caption true of its image (`truths`, one per pair).
    fn hard_negatives(
        &self,
        img_f: &Tensor,
        txt_f: &Tensor,
        truths: &[&Option<Arc<dyn CaptionTruth>>],
        step: u64,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let sim = max_over_queries(&img_f.detach(), &txt_f.detach())?
            .broadcast_div(&self.temp.as_tensor().detach())?;
        let mut rng = rng::stream(self.seed, rng::HARD_NEGATIVES, step);
        Ok(sample_hard_negatives_excluding(
            &sim,
            &caption_true_of(truths),
            &mut rng,
        )?)
    }

    /// The three losses of one batch as one graph: `(itc, itm, itg)`. Training takes the same
    /// gradient in two passes and parallel shards (step.rs); this is its reference.
    pub fn losses(&self, b: &Batch, step: u64) -> Result<(Tensor, Tensor, Tensor)> {
        let n = b.len();
        let image = self
            .model
            .image_embeds(&b.pixel_tensor(&self.parts.device)?)?;
        let ids = Tensor::new(b.tokens.ids.clone(), &self.parts.device)?;
        let mask = &b.tokens.mask;

        // ITC: queries alone vs the [CLS] feature of the text alone.
        let img_f = self
            .model
            .itc_image_features(&self.model.query_output(&image)?)?;
        let txt_f = self
            .model
            .itc_text_features(&self.model.text_output(&ids, mask)?)?;
        let temp = self.temp.as_tensor();
        let itc = itc_loss(&img_f, &txt_f, temp)?;

        // ITM: one hard negative per image and per text, drawn from the ITC similarities.
        let truths: Vec<_> = b.truths.iter().collect();
        let (text_for_image, image_for_text) =
            self.hard_negatives(&img_f, &txt_f, &truths, step)?;
        let neg_img_idx = Tensor::new(
            image_for_text.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &self.parts.device,
        )?;
        let images3 = Tensor::cat(&[&image, &image.index_select(&neg_img_idx, 0)?, &image], 0)?;
        let mut ids3 = b.tokens.ids.clone();
        ids3.extend(b.tokens.ids.iter().cloned());
        ids3.extend(text_for_image.iter().map(|&j| b.tokens.ids[j].clone()));
        let mut mask3 = mask.clone();
        mask3.extend(mask.iter().cloned());
        mask3.extend(text_for_image.iter().map(|&j| mask[j].clone()));
        let logits =
            self.model
                .itm_logits(&images3, &Tensor::new(ids3, &self.parts.device)?, &mask3)?;
        let itm = itm_loss(&logits)?;

        // ITG: [DEC] replaces [CLS]; decode through the multimodal causal mask.
        let dec = decoder_ids(&b.tokens.ids, self.dec_id);
        let dec_t = Tensor::new(dec.clone(), &self.parts.device)?;
        let itg_logits = self.model.itg_logits(&image, &dec_t, mask)?;
        let itg = itg_loss(&itg_logits, &dec, mask)?;
        debug_assert_eq!(logits.dim(0)?, 3 * n);
        Ok((itc, itm, itg))
    }
}

impl Task for QformerTask {
    fn parts(&self) -> &TaskParts {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut TaskParts {
        &mut self.parts
    }

    fn loss_names(&self) -> &'static [&'static str] {
        &["itc", "itm", "itg"]
    }

    fn data_parallel(&self) -> Result<()> {
        match self.distill {
            Some(_) => Err(crate::train::distill::not_data_parallel()),
            None => Ok(()),
        }
    }

    fn grads(&mut self, micro: &[Batch], step: u64) -> Result<(Grads, LossTerms)> {
        let (grads, terms, momentum) = self.step_grads(micro, step)?;
        if let (Some(d), Some((img_m, txt_m, ids))) = (self.distill.as_mut(), momentum) {
            d.state.queues.push(&img_m, &txt_m, &ids)?;
        }
        Ok((grads, terms))
    }

    fn after_step(&mut self) -> Result<()> {
        // BLIP/ALBEF keep the temperature in [0.001, 0.5].
        let clamped = self.temp.as_tensor().clamp(TEMP_MIN, TEMP_MAX)?;
        self.temp.set(&clamped)?;
        if let Some(d) = &self.distill {
            d.state.update()?;
        }
        Ok(())
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        match &self.distill {
            Some(d) => d.state.state(),
            None => Ok(HashMap::new()),
        }
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>, from: &str) -> Result<()> {
        match &mut self.distill {
            Some(d) => d.state.load_state(state, from),
            None => Ok(()),
        }
    }

    fn scalars(&self) -> Vec<(String, f32)> {
        crate::nn::host::f32_of(self.temp.as_tensor())
            .map(|t| vec![("temp".to_string(), t)])
            .unwrap_or_default()
    }

    fn hf_config(&self) -> serde_json::Value {
        self.config.to_hf_json()
    }
}
