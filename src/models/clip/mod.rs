//! CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
//! Supervision"): an image tower and a text tower, each linearly projected into one joint space,
//! with a learned temperature. Tensor names follow transformers' `CLIPModel`
//! (models/clip/modeling_clip.py) so HF checkpoints load unchanged, and the standalone
//! `CLIPVisionModelWithProjection` / `CLIPTextModelWithProjection` layouts load too.

pub mod config;
pub mod encoder;
pub mod resnet;
pub mod text;
pub mod vision;

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::nn::{linear_no_bias, Linear};

pub use config::{ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use text::ClipText;

pub use resnet::{ModifiedResNet, ResNetConfig};
pub use vision::ClipVision;

/// Which towers a checkpoint holds (from `model_type` in its config.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipLayout {
    /// `CLIPModel`: both towers, both projections and `logit_scale`.
    Full,
    /// `CLIPVisionModelWithProjection`.
    VisionOnly,
    /// `CLIPTextModelWithProjection`.
    TextOnly,
}

#[derive(Clone, Debug)]
pub struct Clip {
    pub vision: Option<ClipVision>,
    /// The ResNet image tower, when the config has one (then `vision` is `None`); its attention
    /// pooling projects into the joint space itself.
    pub resnet: Option<Box<ModifiedResNet>>,
    pub text: Option<ClipText>,
    visual_projection: Option<Linear>,
    text_projection: Option<Linear>,
    /// Learned log temperature; logits = exp(logit_scale) · cos (CLIP §2.5).
    pub logit_scale: Option<Tensor>,
    /// SigLIP's learned logit bias, present in models trained with the sigmoid loss (stored
    /// beside the HF tensors; transformers' CLIPModel ignores it).
    pub logit_bias: Option<Tensor>,
    pub config: ClipConfig,
}

impl Clip {
    /// Builds the model over `vb` (a checkpoint or a `VarMap` for training).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig, layout: ClipLayout) -> Result<Self> {
        let (with_vision, with_text) = match layout {
            ClipLayout::Full => (true, true),
            ClipLayout::VisionOnly => (true, false),
            ClipLayout::TextOnly => (false, true),
        };
        let (vproj_dim, tproj_dim) = match layout {
            ClipLayout::Full => (cfg.projection_dim, cfg.projection_dim),
            _ => (
                cfg.vision_config.projection_dim,
                cfg.text_config.projection_dim,
            ),
        };
        let resnet = match (&cfg.vision_resnet, with_vision) {
            (Some(r), true) => Some(Box::new(ModifiedResNet::new(vb.pp("visual"), r)?)),
            _ => None,
        };
        let with_vit = with_vision && resnet.is_none();
        let vision = with_vit
            .then(|| ClipVision::new(vb.pp("vision_model"), &cfg.vision_config))
            .transpose()?;
        let text = with_text
            .then(|| ClipText::new(vb.pp("text_model"), &cfg.text_config))
            .transpose()?;
        let visual_projection = with_vit
            .then(|| {
                linear_no_bias(
                    cfg.vision_config.hidden_size,
                    vproj_dim,
                    vb.pp("visual_projection"),
                )
            })
            .transpose()?;
        let text_projection = with_text
            .then(|| {
                linear_no_bias(
                    cfg.text_config.hidden_size,
                    tproj_dim,
                    vb.pp("text_projection"),
                )
            })
            .transpose()?;
        let logit_scale = (layout == ClipLayout::Full)
            .then(|| {
                vb.get_with_hints(
                    (),
                    "logit_scale",
                    candle_nn::Init::Const(cfg.logit_scale_init_value),
                )
            })
            .transpose()?;
        let logit_bias = (layout == ClipLayout::Full && vb.contains_tensor("logit_bias"))
            .then(|| vb.get((), "logit_bias"))
            .transpose()?;
        Ok(Self {
            vision,
            resnet,
            text,
            visual_projection,
            text_projection,
            logit_scale,
            logit_bias,
            config: cfg.clone(),
        })
    }

    /// Mixed precision (`train.precision = "bf16"`): both towers' encoder layers run their
    /// products in `dtype` ([`encoder::Encoder::set_compute`]); embeddings, LayerNorms,
    /// projections and the weights stay float32. A ResNet image tower has no such mode.
    pub fn set_compute(&mut self, dtype: candle_core::DType) -> crate::error::Result<()> {
        if dtype != candle_core::DType::F32 {
            self.vit_only("train.precision = \"bf16\"", "trains in float32")?;
        }
        self.encoders_mut().for_each(|e| e.set_compute(dtype));
        Ok(())
    }

    /// Gradient checkpointing (`train.grad_checkpointing`): in training, both towers' encoder
    /// layers keep only their inputs for the backward pass and run again there
    /// ([`encoder::Encoder::set_checkpointing`]). A ResNet image tower has no such mode.
    pub fn set_checkpointing(&mut self, on: bool) -> crate::error::Result<()> {
        if on {
            self.vit_only("train.grad_checkpointing", "keeps its activations")?;
        }
        self.encoders_mut().for_each(|e| e.set_checkpointing(on));
        Ok(())
    }

    /// Refuses the training mode `key` for a ResNet image tower, which has none.
    fn vit_only(&self, key: &str, instead: &str) -> crate::error::Result<()> {
        match self.resnet {
            Some(_) => Err(crate::error::Error::input(format!(
                "{key} is for ViT image towers; this CLIP's ResNet tower {instead}"
            ))),
            None => Ok(()),
        }
    }

    /// Both towers' transformers (those present).
    fn encoders_mut(&mut self) -> impl Iterator<Item = &mut encoder::Encoder> {
        let vision = self.vision.as_mut().map(ClipVision::encoder_mut);
        vision
            .into_iter()
            .chain(self.text.as_mut().map(ClipText::encoder_mut))
    }

    /// `get_image_features`: projected pooled image features, not normalised. `[B, P]`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        if let Some(resnet) = &self.resnet {
            return resnet.forward(pixels);
        }
        let (vision, proj) = match (&self.vision, &self.visual_projection) {
            (Some(v), Some(p)) => (v, p),
            _ => candle_core::bail!("this checkpoint has no image tower"),
        };
        proj.forward(&vision.forward(pixels)?.1)
    }

    /// [`Clip::image_features`] as training computes them: a ResNet tower normalises with the
    /// batch's statistics and, with `update_bn`, moves its running statistics; a ViT is the same
    /// either way.
    pub fn image_features_train(&self, pixels: &Tensor, update_bn: bool) -> Result<Tensor> {
        match &self.resnet {
            Some(resnet) => resnet.forward_train(pixels, update_bn),
            None => self.image_features(pixels),
        }
    }

    /// `get_text_features`: projected pooled text features of a padded batch (`input_ids`,
    /// `attention_mask`), not normalised. `[B, P]`.
    pub fn text_features(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor> {
        let (text, proj) = match (&self.text, &self.text_projection) {
            (Some(t), Some(p)) => (t, p),
            _ => candle_core::bail!("this checkpoint has no text tower"),
        };
        proj.forward(&text.forward(ids, mask)?.1)
    }

    /// The side of the square images the image tower takes; `None` without an image tower.
    pub fn image_size(&self) -> Option<usize> {
        match (&self.resnet, &self.vision) {
            (Some(r), _) => Some(r.config().image_size),
            (None, Some(v)) => Some(v.config().image_size),
            (None, None) => None,
        }
    }

    /// exp(logit_scale) as a float; 100 (CLIP's cap) for a single-tower checkpoint.
    pub fn logit_scale_exp(&self) -> Result<f32> {
        match &self.logit_scale {
            Some(t) => Ok(crate::nn::host::f32_of(t)?.exp()),
            None => Ok(100.0),
        }
    }

    /// `logits_per_image`: exp(t) · normalised images · normalised textsᵀ. `[Bi, Bt]`.
    pub fn logits_per_image(
        &self,
        image_features: &Tensor,
        text_features: &Tensor,
    ) -> Result<Tensor> {
        let i = crate::nn::ops::l2_normalize(image_features)?;
        let t = crate::nn::ops::l2_normalize(text_features)?;
        let scale = match &self.logit_scale {
            Some(s) => s.exp()?,
            None => Tensor::new(100f32, i.device())?,
        };
        i.matmul(&t.t()?)?.broadcast_mul(&scale)
    }
}
