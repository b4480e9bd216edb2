//! Inference over a model directory: one [`Pipeline`] per [`ModelKind`], each turning files and
//! strings into what the verbs print — embeddings, zero-shot predictions, ITM/ITC scores,
//! reranked retrieval, captions. Imports models, data, objectives, nn and io; never train, eval,
//! apps or the CLI.

pub mod ann;
pub mod blip2;
pub mod clip;
pub mod convert;
pub mod generate;
pub mod index;
pub mod lm_generate;
pub mod qformer;
pub mod rank;
pub mod zeroshot;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use blip2::Blip2Pipeline;
pub use clip::ClipPipeline;
pub use qformer::QformerPipeline;

use crate::data::image::RgbImage;
use crate::error::{Error, Result};
use crate::models::{ModelDir, ModelKind};

/// The first 40 characters of `s` (an ellipsis when cut), to quote a user's text in a warning.
pub(crate) fn short(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if s.chars().nth(40).is_some() {
        out.push('…');
    }
    out
}

/// Anything that maps images and texts into the joint space (L2-normalised rows).
pub trait Embedder {
    fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor>;
    fn embed_texts(&self, texts: &[String]) -> Result<Tensor>;
}

/// A loaded model directory, ready for inference; which one follows from its [`ModelKind`].
pub enum Pipeline {
    Clip(ClipPipeline),
    Qformer(QformerPipeline),
    /// BLIP-2 stage 2: the Q-Former feeding a frozen language model.
    Blip2(Box<Blip2Pipeline>),
}

impl Pipeline {
    /// Opens `dir` and loads the pipeline of its kind on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let md = ModelDir::open(dir)?;
        match &md.kind {
            ModelKind::Clip(..) => Ok(Pipeline::Clip(ClipPipeline::from_dir(&md, device)?)),
            ModelKind::Qformer(_) => Ok(Pipeline::Qformer(QformerPipeline::from_dir(&md, device)?)),
            ModelKind::Blip2Lm(_) => Ok(Pipeline::Blip2(Box::new(Blip2Pipeline::from_dir(
                &md, device,
            )?))),
            other => Err(Error::input(format!(
                "{} holds a {} model, which no vlalign verb runs (CLIP, BLIP-2 Q-Former and \
                 BLIP-2 stage-2 directories do)",
                dir.display(),
                other.name()
            ))),
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Pipeline::Clip(p) => &p.dir,
            Pipeline::Qformer(p) => &p.dir,
            Pipeline::Blip2(p) => &p.dir,
        }
    }

    fn kind_name(&self) -> &'static str {
        match self {
            Pipeline::Clip(_) => "CLIP",
            Pipeline::Qformer(_) => "BLIP-2 Q-Former",
            Pipeline::Blip2(_) => "BLIP-2 (Q-Former + language model)",
        }
    }

    fn wrong(&self, what: &str, wanted: &str) -> Error {
        Error::input(format!(
            "{} holds a {} model; {what} needs {wanted}",
            self.dir().display(),
            self.kind_name()
        ))
    }

    /// The CLIP pipeline; `what` (e.g. "`vlalign embed`") names the caller in the error.
    pub fn into_clip(self, what: &str) -> Result<ClipPipeline> {
        match self {
            Pipeline::Clip(p) => Ok(p),
            other => Err(other.wrong(what, "a CLIP model directory")),
        }
    }

    /// The BLIP-2 stage-2 pipeline; `what` names the caller in the error.
    pub fn into_blip2(self, what: &str) -> Result<Blip2Pipeline> {
        match self {
            Pipeline::Blip2(p) => Ok(*p),
            other => Err(other.wrong(
                what,
                "a BLIP-2 stage-2 directory (Blip2ForConditionalGeneration: a Q-Former feeding a \
                 language model)",
            )),
        }
    }

    /// The Q-Former pipeline; `what` names the caller in the error.
    pub fn into_qformer(self, what: &str) -> Result<QformerPipeline> {
        match self {
            Pipeline::Qformer(p) => Ok(p),
            other => Err(other.wrong(what, "a BLIP-2 Q-Former directory")),
        }
    }
}
