//! CLIP pretraining as a [`Task`]: both towers trained from scratch with the symmetric InfoNCE
//! (or SigLIP) loss over L2-normalised projected features.
//!
//! Gradient accumulation keeps the contrastive loss exact over the accumulated batch, as
//! open_clip's `--accum-freq` (and GradCache, Gao et al. 2021) do: features of every micro-batch
//! are first computed without keeping their graphs; then each micro-batch is recomputed live and
//! the full-batch loss — its own features live, the others cached — is backpropagated. Summed
//! over micro-batches this is exactly the large-batch gradient. Unlike open_clip, the
//! temperature is live only in the first pass, so its gradient is counted once, not K times.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::data::batch::Batch;
use crate::data::image::ImageProcessor;
use crate::data::text::TextTokenizer;
use crate::error::Result;
use crate::infer::ClipPipeline;
use crate::models::clip::{Clip, ClipConfig, ClipLayout};
use crate::nn::ops::l2_normalize;
use crate::objectives::contrastive::{ContrastiveLoss, CLIP_LOGIT_SCALE_MAX};
use crate::objectives::distill::{distilled_itc_loss, hard_targets, soft_targets};
use crate::train::config::{DistillSpec, ModelSpec, Precision};
use crate::train::distill::{Distillation, FeatureQueues};
use crate::train::optim::Grads;
use crate::train::task::{ExtraFiles, LossTerms, Task, TaskParts};
use crate::train::tokenizer::{clip_special_ids, tokenizer_for};

pub struct ClipTask {
    pub parts: TaskParts,
    pub model: Clip,
    pub loss: ContrastiveLoss,
    pub config: ClipConfig,
    /// Momentum distillation (`[distill]`), when the run uses it.
    pub distill: Option<Box<ClipDistill>>,
    /// The arithmetic of a step (`train.precision`; [`ClipTask::with_precision`]).
    pub precision: Precision,
}

/// ALBEF's momentum distillation for CLIP: the momentum CLIP (towers and projections, an EMA of
/// the trained ones) and its state.
pub struct ClipDistill {
    pub state: Distillation,
    pub model: Clip,
}

impl ClipTask {
    /// A randomly initialised CLIP; `seed` fixes the initial weights.
    pub fn new(
        config: ClipConfig,
        loss: ContrastiveLoss,
        processor: ImageProcessor,
        tokenizer: TextTokenizer,
        extra_files: ExtraFiles,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = crate::nn::init::seeded_var_builder(&varmap, seed, DType::F32, device);
        let parts = TaskParts {
            varmap,
            frozen: HashMap::new(),
            processor,
            tokenizer,
            extra_files,
            device: device.clone(),
            comm: crate::dist::single(),
        };
        Self::assemble(config, loss, vb, parts)
    }

    /// The CLIP of `config` with its variables created through `vb` (which adds them to
    /// `parts.varmap`): the temperature (and SigLIP's bias) at the loss's initial values unless
    /// `vb` already has them.
    pub(super) fn assemble(
        config: ClipConfig,
        loss: ContrastiveLoss,
        vb: VarBuilder<'static>,
        parts: TaskParts,
    ) -> Result<Self> {
        let scale_init = match loss {
            ContrastiveLoss::InfoNce => config.logit_scale_init_value,
            ContrastiveLoss::SigLip => loss.logit_scale_init(),
        };
        vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(scale_init))?;
        if let Some(bias) = loss.logit_bias_init() {
            vb.get_with_hints((), "logit_bias", candle_nn::Init::Const(bias))?;
        }
        let model = Clip::new(vb, &config, ClipLayout::Full)?;
        Ok(Self {
            parts,
            model,
            loss,
            config,
            distill: None,
            precision: Precision::F32,
        })
    }

    /// Trains in `precision` (`train.precision`): with `Bf16`, both towers' encoder layers run
    /// their products in bfloat16 over the float32 master weights (`Clip::set_compute`). Call
    /// before [`ClipTask::with_distill`], which gives the momentum CLIP the same precision.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        if precision == Precision::F32 {
            return Ok(self);
        }
        self.model.set_compute(precision.compute_dtype())?;
        precision.warn_if_cpu(&self.parts.device);
        self.precision = precision;
        Ok(self)
    }

    /// Gradient checkpointing (`train.grad_checkpointing`) of both towers' encoder layers
    /// (`Clip::set_checkpointing`). The momentum CLIP of distillation runs without a graph and
    /// needs none.
    pub fn with_checkpointing(mut self, on: bool) -> Result<Self> {
        self.model.set_checkpointing(on)?;
        Ok(self)
    }

    /// Turns on momentum distillation: a momentum copy of every variable (equal to the model
    /// now) and queues seeded by `seed`.
    pub fn with_distill(mut self, spec: &DistillSpec, seed: u64) -> Result<Self> {
        let device = self.parts.device.clone();
        let dim = self.config.projection_dim;
        let state = Distillation::new(spec, &self.vars(), &[dim], dim, seed, &device)?;
        let vb = VarBuilder::from_varmap(&state.varmap, DType::F32, &device);
        let mut model = Clip::new(vb, &self.config, ClipLayout::Full)?;
        model.set_compute(self.precision.compute_dtype())?;
        // Every tensor of the momentum CLIP must be a copy; a name the copy lacks would have
        // been created at random by the builder.
        if state.varmap.all_vars().len() != self.vars().len() {
            return Err(crate::error::Error::input(
                "the momentum CLIP does not have the trained CLIP's variables",
            ));
        }
        self.distill = Some(Box::new(ClipDistill { state, model }));
        Ok(self)
    }

    /// A fresh CLIP of the `[model]` section `spec`, its tokenizer and the CLIP preprocessing at
    /// its image size; `seed` fixes the initial weights.
    pub fn from_spec(
        spec: &ModelSpec,
        loss: ContrastiveLoss,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let (tok, extra) = tokenizer_for(&spec.tokenizer, spec.context_length)?;
        let (bos, eos, pad) = clip_special_ids(&spec.tokenizer, &tok)?;
        let config = spec.clip_config(tok.vocab_size(), bos, eos, pad);
        let processor = ImageProcessor::clip_default(spec.image_size);
        Self::new(config, loss, processor, tok, extra, seed, device)
    }

    /// The current weights, detached, as an inference pipeline (fast fused ops, no graph).
    pub fn pipeline(&self) -> Result<ClipPipeline> {
        let tensors = self
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        let device = &self.parts.device;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        // Frozen weights laid out as a loaded model's (a copy while the pipeline lives), so that
        // it embeds bit for bit as the model directory it would be saved as.
        let model = Clip::new(vb, &self.config, ClipLayout::Full)?;
        Ok(ClipPipeline::from_parts(
            model,
            Some(self.parts.tokenizer.clone()),
            Some(self.parts.processor.clone()),
            device,
        ))
    }

    /// L2-normalised (image, text) features of a batch, as training computes them; `update_bn`
    /// moves a ResNet tower's BatchNorm running statistics (once per micro-batch: the
    /// recomputation of accumulation's second pass passes `false`).
    pub fn features(&self, b: &Batch, update_bn: bool) -> Result<(Tensor, Tensor)> {
        features_of(&self.model, b, &self.parts.device, update_bn)
    }

    /// One optimiser step's gradients with momentum distillation (`objectives::distill`): the
    /// momentum features of the whole batch and the queues make the columns and the targets;
    /// each online row depends only on its own features and those constants, so micro-batches
    /// add up to the large-batch gradient with no second pass. The batch's momentum features
    /// then enter the queues.
    fn distilled_grads(&mut self, micro: &[Batch], step: u64) -> Result<(Grads, LossTerms)> {
        let scale = self
            .model
            .logit_scale
            .clone()
            .expect("full CLIP has logit_scale");
        let d = self.distill.as_ref().expect("distilling");
        let dev = &self.parts.device;
        let (mut im, mut tm, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for b in micro {
            let (i, t) = features_of(&d.model, b, dev, false)?;
            im.push(i.detach());
            tm.push(t.detach());
            ids.extend_from_slice(&b.image_ids);
        }
        let (img_m, txt_m) = (Tensor::cat(&im, 0)?, Tensor::cat(&tm, 0)?);
        let q = &d.state.queues;
        let image_cols = FeatureQueues::columns(&img_m, &q.image)?;
        let text_cols = FeatureQueues::columns(&txt_m, &q.text)?;
        let s = crate::nn::host::f64_of(&scale.exp()?)?;
        let alpha = d.state.alpha(step);
        let hard = hard_targets(&ids, &q.ids, d.state.spec.same_image_targets, dev)?;
        let t_i2t = soft_targets(&img_m, &text_cols, s, alpha, &hard)?;
        let t_t2i = soft_targets(&txt_m, &image_cols, s, alpha, &hard)?;
        let (rows, mut offset, mut total) = (ids.len(), 0usize, 0f32);
        let mut grads = Grads::new();
        for b in micro {
            let n = b.len();
            let (img, txt) = self.features(b, true)?;
            let loss = distilled_itc_loss(
                &img,
                &txt,
                &image_cols,
                &text_cols,
                &scale,
                &t_i2t.narrow(0, offset, n)?,
                &t_t2i.narrow(0, offset, n)?,
                rows,
            )?;
            total += crate::nn::host::f32_of(&loss)?;
            self.parts.collect(&loss.backward()?, &mut grads)?;
            offset += n;
        }
        if let Some(d) = self.distill.as_mut() {
            d.state.queues.push(&img_m, &txt_m, &ids)?;
        }
        Ok((
            grads,
            LossTerms {
                total,
                parts: vec![("contrastive".into(), total)],
            },
        ))
    }

    fn loss_of(&self, img: &Tensor, txt: &Tensor, scale: &Tensor) -> Result<Tensor> {
        Ok(self
            .loss
            .loss(img, txt, scale, self.model.logit_bias.as_ref())?)
    }
}

impl Task for ClipTask {
    fn parts(&self) -> &TaskParts {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut TaskParts {
        &mut self.parts
    }

    fn loss_names(&self) -> &'static [&'static str] {
        &["contrastive"]
    }

    fn data_parallel(&self) -> Result<()> {
        if self.distill.is_some() {
            return Err(crate::train::distill::not_data_parallel());
        }
        if self.config.vision_resnet.is_some() {
            return Err(crate::error::Error::input(
                "a ResNet image tower does not train data-parallel: its BatchNorm normalises \
                 with each rank's own batch statistics, so N ranks would not equal one process \
                 with the global batch (open_clip uses per-rank statistics too); run it as one \
                 process",
            ));
        }
        Ok(())
    }

    fn grads(&mut self, micro: &[Batch], step: u64) -> Result<(Grads, LossTerms)> {
        if self.distill.is_some() {
            return self.distilled_grads(micro, step);
        }
        if self.parts.comm.size() > 1 {
            let comm = self.parts.comm.clone();
            return self.data_parallel_grads(micro, comm.as_ref());
        }
        let scale = self
            .model
            .logit_scale
            .clone()
            .expect("full CLIP has logit_scale");
        let mut grads = Grads::new();
        let loss_value;
        if micro.len() == 1 {
            let (img, txt) = self.features(&micro[0], true)?;
            let loss = self.loss_of(&img, &txt, &scale)?;
            loss_value = crate::nn::host::f32_of(&loss)?;
            self.parts.collect(&loss.backward()?, &mut grads)?;
        } else {
            // Pass 1: every micro-batch's features, graphs dropped.
            let mut cached = Vec::with_capacity(micro.len());
            for b in micro {
                let (i, t) = self.features(b, true)?;
                cached.push((i.detach(), t.detach()));
            }
            let mut first = None;
            // Pass 2: the full-batch loss with one micro-batch live at a time.
            for (j, b) in micro.iter().enumerate() {
                let (live_i, live_t) = self.features(b, false)?;
                let imgs: Vec<&Tensor> = cached
                    .iter()
                    .enumerate()
                    .map(|(k, c)| if k == j { &live_i } else { &c.0 })
                    .collect();
                let txts: Vec<&Tensor> = cached
                    .iter()
                    .enumerate()
                    .map(|(k, c)| if k == j { &live_t } else { &c.1 })
                    .collect();
                let s = if j == 0 {
                    scale.clone()
                } else {
                    scale.detach()
                };
                let loss = self.loss_of(&Tensor::cat(&imgs, 0)?, &Tensor::cat(&txts, 0)?, &s)?;
                first.get_or_insert(crate::nn::host::f32_of(&loss)?);
                self.parts.collect(&loss.backward()?, &mut grads)?;
            }
            loss_value = first.unwrap_or(f32::NAN);
        }
        Ok((
            grads,
            LossTerms {
                total: loss_value,
                parts: vec![("contrastive".into(), loss_value)],
            },
        ))
    }

    fn after_step(&mut self) -> Result<()> {
        // CLIP §2.5: the temperature is clipped to keep logits ≤ 100.
        if let Some(v) = self.parts.var("logit_scale") {
            let clamped = v.as_tensor().clamp(0.0, CLIP_LOGIT_SCALE_MAX)?;
            v.set(&clamped)?;
        }
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
        let mut out = Vec::new();
        if let Ok(s) = self.model.logit_scale_exp() {
            out.push(("logit_scale".into(), s));
        }
        out
    }

    fn hf_config(&self) -> serde_json::Value {
        self.config.to_hf_json()
    }
}

/// L2-normalised (image, text) features of `model` for a batch, as training computes them.
fn features_of(
    model: &Clip,
    b: &Batch,
    device: &Device,
    update_bn: bool,
) -> Result<(Tensor, Tensor)> {
    let pixels = b.pixel_tensor(device)?;
    let img = l2_normalize(&model.image_features_train(&pixels, update_bn)?)?;
    let txt = l2_normalize(&model.text_features(&b.tokens.ids, &b.tokens.mask)?)?;
    Ok((img, txt))
}
