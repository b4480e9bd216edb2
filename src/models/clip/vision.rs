//! CLIP's image tower, a ViT (`CLIPVisionTransformer` in transformers' modeling_clip.py; CLIP
//! §2.4): patch embedding without bias, a class token, learned positions, `pre_layrnorm` (sic,
//! the HF name), the encoder, and `post_layernorm` on the class token.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::config::ClipVisionConfig;
use super::encoder::{Encoder, EncoderShape};
use crate::nn::LayerNorm;

#[derive(Clone, Debug)]
pub struct ClipVision {
    class_embedding: Tensor,
    /// `[hidden, channels, patch, patch]` as the HF Conv2d stores it; applied as a matmul over
    /// patchified pixels (identical arithmetic, and no input gradient computed for the pixels).
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    cfg: ClipVisionConfig,
}

impl ClipVision {
    /// `vb` points at `vision_model`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let p = cfg.patch_size;
        let positions = cfg.grid() * cfg.grid() + 1;
        let shape = EncoderShape {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            act: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        let std = (h as f64).powf(-0.5);
        Ok(Self {
            class_embedding: emb.get_with_hints(h, "class_embedding", normal(std))?,
            patch_embedding: emb.get_with_hints(
                (h, cfg.num_channels, p, p),
                "patch_embedding.weight",
                normal(0.02),
            )?,
            // open_clip's VisionTransformer scales positions like the class token (width^-½).
            position_embedding: emb.get_with_hints(
                (positions, h),
                "position_embedding.weight",
                normal(std),
            )?,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            encoder: Encoder::new(vb.pp("encoder"), &shape)?,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// The transformer, for its training modes ([`Encoder::set_compute`],
    /// [`Encoder::set_checkpointing`]).
    pub fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }

    /// Token embeddings before the encoder: `[B, 1 + grid², hidden]`.
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hgt, wid) = pixels.dims4()?;
        let (size, p) = (self.cfg.image_size, self.cfg.patch_size);
        if c != self.cfg.num_channels || hgt != size || wid != size {
            candle_core::bail!(
                "pixel tensor is [{b}, {c}, {hgt}, {wid}], the vision tower takes [B, {}, {size}, {size}]",
                self.cfg.num_channels
            );
        }
        let h = self.cfg.hidden_size;
        let patches = crate::nn::patch::embed_patches(pixels, &self.patch_embedding, p)?;
        let cls = self.class_embedding.reshape((1, 1, h))?.repeat((b, 1, 1))?;
        Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)
    }

    /// Hidden states after `upto` encoder layers (all when `None`), before `post_layernorm`.
    pub fn hidden_states(&self, pixels: &Tensor, upto: Option<usize>) -> Result<Tensor> {
        let x = self.pre_layrnorm.forward(&self.embed(pixels)?)?;
        self.encoder.forward(&x, None, upto)
    }

    /// Every token after all layers and `post_layernorm` `[B, 1 + grid², hidden]`: the image
    /// features a BLIP-2 Q-Former reads from a frozen CLIP tower (LAVIS's `ln_vision`).
    pub fn normed_hidden_states(&self, pixels: &Tensor) -> Result<Tensor> {
        self.post_norm(&self.hidden_states(pixels, None)?)
    }

    /// `post_layernorm` over every token of `hidden` (the second half of
    /// [`ClipVision::normed_hidden_states`]).
    pub fn post_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(hidden)
    }

    /// `(last_hidden_state, pooled)`: pooled is `post_layernorm` of the class token.
    pub fn forward(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let last = self.hidden_states(pixels, None)?;
        let cls = last.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.post_layernorm.forward(&cls)?;
        Ok((last, pooled))
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn num_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }
}

pub(crate) fn normal(stdev: f64) -> candle_nn::Init {
    candle_nn::Init::Randn { mean: 0.0, stdev }
}
