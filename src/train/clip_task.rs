//! CLIP pretraining as a [`Task`]: both towers trained from scratch with the symmetric InfoNCE
//! (or SigLIP) loss over L2-normalised projected features.
//!
//! Gradient accumulation keeps the contrastive loss exact over the accumulated batch, as
//! open_clip's `--accum-freq` (and GradCache, Gao et al. 2021) do: features of every micro-batch
//! are first computed without keeping their graphs; then each micro-batch is recomputed live and
//! the full-batch loss — its own features live, the others cached — is backpropagated. Summed
//! over micro-batches this is exactly the large-batch gradient. Unlike open_clip, the
//! temperature is live only in the first pass, so its gradient is counted once, not K times.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::optim::Grads;
use super::task::{LossTerms, Task};
use crate::data::image::ImageProcessor;
use crate::data::loader::Batch;
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result};
use crate::model_dir::{write_clip_files, ClipDirContents};
use crate::models::clip::{Clip, ClipConfig, ClipLayout};
use crate::nn::ops::l2_normalize;
use crate::objectives::contrastive::{
    clip_loss, siglip_loss, CLIP_LOGIT_SCALE_MAX, SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContrastiveLoss {
    InfoNce,
    Sigmoid,
}

pub struct ClipTask {
    pub varmap: VarMap,
    pub model: Clip,
    pub loss: ContrastiveLoss,
    pub config: ClipConfig,
    pub processor: ImageProcessor,
    pub tokenizer: TextTokenizer,
    /// Extra files written into model directories (e.g. tokenizer_config.json).
    pub extra_files: Vec<(String, Vec<u8>)>,
    device: Device,
}

impl ClipTask {
    /// A randomly initialised CLIP; `seed` fixes the initial weights.
    pub fn new(
        config: ClipConfig,
        loss: ContrastiveLoss,
        processor: ImageProcessor,
        tokenizer: TextTokenizer,
        extra_files: Vec<(String, Vec<u8>)>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = crate::nn::init::seeded_var_builder(&varmap, seed, DType::F32, device);
        let scale_init = match loss {
            ContrastiveLoss::InfoNce => config.logit_scale_init_value,
            ContrastiveLoss::Sigmoid => SIGLIP_LOGIT_SCALE_INIT,
        };
        vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(scale_init))?;
        if loss == ContrastiveLoss::Sigmoid {
            vb.get_with_hints(
                (),
                "logit_bias",
                candle_nn::Init::Const(SIGLIP_LOGIT_BIAS_INIT),
            )?;
        }
        let model = Clip::new(vb, &config, ClipLayout::Full)?;
        Ok(Self {
            varmap,
            model,
            loss,
            config,
            processor,
            tokenizer,
            extra_files,
            device: device.clone(),
        })
    }

    /// The current weights, detached, as an inference pipeline (fast fused ops, no graph).
    pub fn pipeline(&self) -> Result<crate::pipeline::ClipPipeline> {
        let tensors = self
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        let model = Clip::new(vb, &self.config, ClipLayout::Full)?;
        Ok(crate::pipeline::ClipPipeline::from_parts(
            model,
            Some(self.tokenizer.clone()),
            Some(self.processor.clone()),
            &self.device,
        ))
    }

    /// L2-normalised (image, text) features of a batch.
    pub fn features(&self, b: &Batch) -> Result<(Tensor, Tensor)> {
        let img = l2_normalize(&self.model.image_features(&b.pixel_tensor(&self.device)?)?)?;
        let txt = l2_normalize(&self.model.text_features(&b.tokens)?)?;
        Ok((img, txt))
    }

    fn loss_of(&self, img: &Tensor, txt: &Tensor, scale: &Tensor) -> Result<Tensor> {
        Ok(match self.loss {
            ContrastiveLoss::InfoNce => clip_loss(img, txt, scale)?,
            ContrastiveLoss::Sigmoid => {
                let bias = self
                    .model
                    .logit_bias
                    .as_ref()
                    .expect("sigmoid task has a bias");
                siglip_loss(img, txt, scale, bias)?
            }
        })
    }

    fn collect(&self, grads: &candle_core::backprop::GradStore, into: &mut Grads) -> Result<()> {
        for (name, var) in self.varmap.data().lock().expect("varmap lock").iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                match into.get_mut(name) {
                    Some(acc) => *acc = (&*acc + g)?,
                    None => {
                        into.insert(name.clone(), g.clone());
                    }
                }
            }
        }
        Ok(())
    }
}

impl Task for ClipTask {
    fn vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn grads(&mut self, micro: &[Batch], _step: u64) -> Result<(Grads, LossTerms)> {
        let scale = self
            .model
            .logit_scale
            .clone()
            .expect("full CLIP has logit_scale");
        let mut grads = Grads::new();
        let loss_value;
        if micro.len() == 1 {
            let (img, txt) = self.features(&micro[0])?;
            let loss = self.loss_of(&img, &txt, &scale)?;
            loss_value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            self.collect(&loss.backward()?, &mut grads)?;
        } else {
            // Pass 1: every micro-batch's features, graphs dropped.
            let mut cached = Vec::with_capacity(micro.len());
            for b in micro {
                let (i, t) = self.features(b)?;
                cached.push((i.detach(), t.detach()));
            }
            let mut first = None;
            // Pass 2: the full-batch loss with one micro-batch live at a time.
            for (j, b) in micro.iter().enumerate() {
                let (live_i, live_t) = self.features(b)?;
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
                first.get_or_insert(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                self.collect(&loss.backward()?, &mut grads)?;
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
        let data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get("logit_scale") {
            let clamped = v.as_tensor().clamp(0.0, CLIP_LOGIT_SCALE_MAX)?;
            v.set(&clamped)?;
        }
        Ok(())
    }

    fn scalars(&self) -> Vec<(String, f32)> {
        let mut out = Vec::new();
        if let Ok(s) = self.model.logit_scale_exp() {
            out.push(("logit_scale".into(), s));
        }
        out
    }

    fn write_model(&self, dir: &Path) -> Result<()> {
        let tensors = self
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let contents = ClipDirContents {
            config: &self.config,
            processor: &self.processor,
            tokenizer_json: self.tokenizer.json_bytes(),
        };
        write_clip_files(dir, &contents, &tensors)?;
        for (name, bytes) in &self.extra_files {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }

    fn load_weights(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("model.safetensors");
        self.varmap
            .load(&path)
            .map_err(|e| Error::weights(&path, e.to_string()))
    }
}
