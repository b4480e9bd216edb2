//! A loaded CLIP model directory ready for inference: model, tokenizer and image processor,
//! turning files and strings into L2-normalised embeddings in batches (CLIP §2.5: the joint
//! space is the L2-normalised projections).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::Embedder;
use crate::data::image::{
    load_rgb, processor_for_dir, CropRounding, ImageProcessor, Resize, RgbImage,
};
use crate::data::resample::Filter;
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result};
use crate::models::clip::Clip;
use crate::models::open_clip::{OpenClipConfig, CONFIG_FILE};
use crate::models::ModelDir;
use crate::nn::ops::{ensure_finite, l2_normalize};

/// Inputs per forward pass.
pub const BATCH: usize = 32;

pub struct ClipPipeline {
    pub model: Clip,
    pub tokenizer: Option<TextTokenizer>,
    pub processor: Option<ImageProcessor>,
    pub dir: PathBuf,
    pub device: Device,
    /// A transformers directory without `tokenizer.json`, read with the bundled CLIP BPE: each
    /// text embedding warns so (open_clip's own tokenizer is the bundled one: no warning).
    bundled_tokenizer_fallback: bool,
}

impl ClipPipeline {
    /// Loads a CLIP model directory; any other kind is an error.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_dir(&ModelDir::open(dir)?, device)
    }

    /// Loads an opened model directory, which must hold a CLIP.
    pub fn from_dir(md: &ModelDir, device: &Device) -> Result<Self> {
        let dir = md.path.as_path();
        let (cfg, layout) = md.clip("the CLIP pipeline")?;
        let weights = md.weights()?;
        // Older checkpoints carry the non-persistent `position_ids` buffers.
        let model = weights.build(DType::F32, device, &["position_ids"], |vb| {
            Clip::new(vb, cfg, layout)
        })?;
        let mut bundled_tokenizer_fallback = false;
        let tokenizer = match &model.text {
            None => None,
            Some(text) => {
                let context = text.config().max_position_embeddings;
                let path = dir.join("tokenizer.json");
                let hf_name = md
                    .open_clip()
                    .and_then(|oc| oc.model_cfg.text_cfg.hf_tokenizer_name.as_deref());
                if let (Some(name), false) = (hf_name, path.is_file()) {
                    return Err(Error::config(
                        dir.join(CONFIG_FILE),
                        format!(
                            "text_cfg.hf_tokenizer_name is `{name}`, and there is no \
                             tokenizer.json here; vlalign never downloads: save that \
                             tokenizer's tokenizer.json into this directory"
                        ),
                    ));
                }
                Some(if path.is_file() {
                    TextTokenizer::from_file(&path, context)?
                } else {
                    bundled_tokenizer_fallback = md.open_clip().is_none();
                    TextTokenizer::bundled_clip(context)?
                })
            }
        };
        let processor = match model.image_size() {
            None => None,
            Some(size) => {
                let found = match md.open_clip() {
                    Some(oc) => Some(open_clip_processor(oc, size, dir)?),
                    None => processor_for_dir(dir)?,
                };
                let (p, from) = found.unwrap_or_else(|| {
                    tracing::warn!(
                        "{}: no preprocessor_config.json; using CLIPImageProcessor defaults at {size} px",
                        dir.display()
                    );
                    (ImageProcessor::clip_default(size), dir.join("preprocessor_config.json"))
                });
                if let Some((h, w)) = p.output_size() {
                    if (h, w) != (size, size) {
                        return Err(Error::config(
                            from,
                            format!(
                                "produces {h}x{w} images but the vision tower takes {size}x{size} (vision_config.image_size)"
                            ),
                        ));
                    }
                }
                Some(p)
            }
        };
        Ok(Self {
            model,
            tokenizer,
            processor,
            dir: dir.to_path_buf(),
            device: device.clone(),
            bundled_tokenizer_fallback,
        })
    }

    /// A pipeline over an in-memory model (e.g. the one being trained, detached).
    pub fn from_parts(
        model: Clip,
        tokenizer: Option<TextTokenizer>,
        processor: Option<ImageProcessor>,
        device: &Device,
    ) -> Self {
        Self {
            model,
            tokenizer,
            processor,
            dir: PathBuf::from("<in-memory model>"),
            device: device.clone(),
            bundled_tokenizer_fallback: false,
        }
    }

    fn processor(&self) -> Result<&ImageProcessor> {
        self.processor
            .as_ref()
            .ok_or_else(|| Error::input(format!("{} has no image tower", self.dir.display())))
    }

    /// Preprocesses decoded images into a `[N, 3, H, W]` tensor.
    pub fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        let p = self.processor()?;
        Ok(crate::data::image::pixel_tensor(p, images, &self.device)?)
    }

    /// Normalised embeddings of decoded images, `[N, P]`.
    pub fn embed_rgb(&self, images: &[RgbImage]) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in images.chunks(BATCH) {
            let f = self.model.image_features(&self.pixels(chunk)?)?;
            out.push(l2_normalize(&f)?);
        }
        let e = self.cat(out)?;
        ensure_finite(&e, &format!("{}: image embeddings", self.dir.display()))?;
        Ok(e)
    }

    /// Normalised embeddings of image files, `[N, P]`; decoding errors name the file.
    pub fn embed_image_files(&self, paths: &[PathBuf]) -> Result<Tensor> {
        self.processor()?;
        let mut out = Vec::new();
        for chunk in paths.chunks(BATCH) {
            let imgs = chunk
                .iter()
                .map(|p| load_rgb(p))
                .collect::<Result<Vec<_>>>()?;
            out.push(self.embed_rgb(&imgs)?);
        }
        self.cat(out)
    }

    /// Cosine similarity of each image file to `text` in the joint space (CLIP retrieval),
    /// one score per file in order.
    pub fn text_to_image_scores(&self, paths: &[PathBuf], text: &str) -> Result<Vec<f32>> {
        let images = self.embed_image_files(paths)?;
        let query = self.embed_texts(&[text])?;
        Ok(images.matmul(&query.t()?)?.squeeze(1)?.to_vec1()?)
    }

    /// Normalised embeddings of texts, `[N, P]`. Texts over the context are truncated (keeping
    /// the end-of-text token) with a warning, as transformers does.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| Error::input(format!("{} has no text tower", self.dir.display())))?;
        if !texts.is_empty() && self.bundled_tokenizer_fallback {
            tracing::warn!(
                "{}: no tokenizer.json; using the bundled OpenAI CLIP BPE tokenizer",
                self.dir.display()
            );
        }
        let mut out = Vec::new();
        for chunk in texts.chunks(BATCH) {
            let enc = tok.encode(chunk)?;
            for (t, cut) in chunk.iter().zip(&enc.truncated) {
                if *cut {
                    tracing::warn!(
                        "text {:?} is longer than the model's context of {} tokens; truncated",
                        super::short(t.as_ref()),
                        tok.context()
                    );
                }
            }
            let text = self
                .model
                .text
                .as_ref()
                .expect("tokenizer implies a text tower");
            let b = &enc.batch;
            text.check_batch(&b.ids, &b.mask).map_err(Error::Input)?;
            let f = self.model.text_features(&b.ids, &b.mask)?;
            out.push(l2_normalize(&f)?);
        }
        let e = self.cat(out)?;
        ensure_finite(&e, &format!("{}: text embeddings", self.dir.display()))?;
        Ok(e)
    }

    fn cat(&self, parts: Vec<Tensor>) -> Result<Tensor> {
        if parts.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.model.config.projection_dim),
                DType::F32,
                &self.device,
            )?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl Embedder for ClipPipeline {
    fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.embed_rgb(images)
    }

    fn embed_texts(&self, texts: &[String]) -> Result<Tensor> {
        ClipPipeline::embed_texts(self, texts)
    }
}

/// open_clip's eval transform (transform.py `image_transform`, `is_train=False`) as an image
/// processor: `Resize(size, bicubic|bilinear)` of the shortest edge (`resize_mode = "shortest"`)
/// or straight to size² (`"squash"`), torchvision's `CenterCrop` (offsets rounded half to even),
/// then `ToTensor` and `Normalize(mean, std)`. open_clip converts to RGB after resizing; vlalign
/// converts first (as transformers does), which differs only for palette and alpha images.
pub fn open_clip_processor(
    cfg: &OpenClipConfig,
    size: usize,
    dir: &Path,
) -> Result<(ImageProcessor, PathBuf)> {
    let from = dir.join(CONFIG_FILE);
    let p = &cfg.preprocess_cfg;
    let bad = |key: &str, msg: String| Error::config(&from, format!("preprocess_cfg.{key}: {msg}"));
    let filter = match p.interpolation.as_str() {
        "bilinear" => Filter::Bilinear,
        // open_clip maps every other value ("bicubic", "random") to bicubic at eval.
        _ => Filter::Bicubic,
    };
    let (resize, crop) = match p.resize_mode.as_str() {
        "shortest" => (Resize::ShortestEdge(size), Some((size, size))),
        "squash" => (Resize::Exact(size, size), None),
        other => {
            return Err(bad(
                "resize_mode",
                format!("`{other}` is not supported (shortest, squash)"),
            ))
        }
    };
    for (key, v) in [("mean", p.mean), ("std", p.std)] {
        if v.iter().any(|x| !x.is_finite()) || (key == "std" && v.iter().any(|x| *x <= 0.0)) {
            return Err(bad(key, format!("{v:?} must be finite (std positive)")));
        }
    }
    let processor = ImageProcessor {
        resize: Some(resize),
        filter,
        crop,
        crop_rounding: CropRounding::HalfEven,
        rescale_factor: Some(1.0 / 255.0),
        mean: p.mean,
        std: p.std,
        normalize: true,
    };
    Ok((processor, from))
}
