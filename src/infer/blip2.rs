//! A BLIP-2 stage-2 model directory ready for inference: the model, the language model's
//! tokenizer and the image preprocessing, and prompted generation (BLIP-2 §3.3, §4.2:
//! captioning with an optional prompt, zero-shot VQA with "Question: {} Answer:").
//!
//! The tokenizer is the directory's `tokenizer.json`, else the external LM's (its directory's
//! `tokenizer.json`, or the one rebuilt from a GGUF's metadata).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::data::image::{processor_for_dir, ImageProcessor, RgbImage};
use crate::error::{Error, Result};
use crate::models::blip2::Blip2Lm;
use crate::models::lm::gguf::{self, Gguf};
use crate::models::ModelDir;
use crate::nn::ops::ensure_finite;

use super::lm_generate::{generate, GenerationConfig};

/// Images per forward pass.
const BATCH: usize = 8;

/// BLIP-2's zero-shot VQA prompt (§4.2, LAVIS `prompt = "Question: {} Answer:"`).
pub const QUESTION_PROMPT: &str = "Question: {} Answer:";

pub struct Blip2Pipeline {
    pub model: Blip2Lm,
    pub tokenizer: tokenizers::Tokenizer,
    pub processor: ImageProcessor,
    pub dir: PathBuf,
    pub device: Device,
}

/// One generated text: the ids after the prompt (the stop token included when one was
/// produced), their decoding (special tokens and the stop token left out, trimmed) and the
/// hypothesis score.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub score: f32,
}

/// The tokenizer of a stage-2 directory (see the module header).
pub fn tokenizer_for(dir: &Path, language_model: Option<&str>) -> Result<tokenizers::Tokenizer> {
    let mut tried = vec![dir.join("tokenizer.json")];
    if let Some(p) = language_model {
        let lm = dir.join(p);
        if let Some(file) = gguf::find(&lm)? {
            if !tried[0].is_file() {
                let json = Gguf::open(&file)?.tokenizer_json()?;
                return tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(
                    |e| Error::Tokenizer {
                        path: file.clone(),
                        msg: e.to_string(),
                    },
                );
            }
        } else {
            tried.push(lm.join("tokenizer.json"));
        }
    }
    let path = tried.iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::input(format!(
            "{}: no tokenizer.json (a BLIP-2 directory needs its language model's tokenizer)",
            dir.display()
        ))
    })?;
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.clone(),
        msg: e.to_string(),
    })
}

impl Blip2Pipeline {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_dir(&ModelDir::open(dir)?, device)
    }

    pub fn from_dir(md: &ModelDir, device: &Device) -> Result<Self> {
        let dir = md.path.as_path();
        let cfg = md.blip2_lm("the BLIP-2 pipeline")?;
        let tokenizer = tokenizer_for(dir, cfg.language_model.as_deref())?;
        let model = Blip2Lm::from_model_dir(md, device)?;
        let size = cfg.blip2.vision.image_size();
        let processor = match processor_for_dir(dir)? {
            Some((p, _)) => p,
            None => ImageProcessor::clip_default(size),
        };
        Ok(Self {
            model,
            tokenizer,
            processor,
            dir: dir.to_path_buf(),
            device: device.clone(),
        })
    }

    /// The soft visual prompts `[N, Q, W]` of `images`.
    pub fn image_prefix(&self, images: &[RgbImage]) -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in images.chunks(BATCH) {
            let px = crate::data::image::pixel_tensor(&self.processor, chunk, &self.device)?;
            parts.push(self.model.image_prefix(&px)?);
        }
        let t = Tensor::cat(&parts, 0)?;
        ensure_finite(
            &t,
            &format!("{}: projected query outputs", self.dir.display()),
        )?;
        Ok(t)
    }

    /// Token ids of a prompt as the LM's tokenizer writes them (its own BOS, if it adds one);
    /// no prompt is the LM's BOS alone, as transformers' `generate` starts (nothing when the LM
    /// has none).
    pub fn prompt_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        match prompt.filter(|p| !p.is_empty()) {
            Some(p) => Ok(self
                .tokenizer
                .encode(p, true)
                .map_err(|e| Error::input(format!("cannot tokenise the prompt: {e}")))?
                .get_ids()
                .to_vec()),
            None => Ok(self.model.lm_config().bos_token_id().into_iter().collect()),
        }
    }

    /// The stop tokens: the LM's eos, and a newline when it is one token (LAVIS blip2_opt.py
    /// generates with `eos_token_id = "\n"`: a caption is one line).
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stop = self.model.lm_config().eos_token_ids().to_vec();
        if let Ok(e) = self.tokenizer.encode("\n", false) {
            if let [nl] = e.get_ids() {
                stop.push(*nl);
            }
        }
        stop.sort_unstable();
        stop.dedup();
        stop
    }

    /// Continues `prompt` (or nothing) after each image's visual prompts. Sampling draws image
    /// i from `rngs[i]` (one per image, or none for greedy and beam search).
    pub fn generate(
        &self,
        images: &[RgbImage],
        prompt: Option<&str>,
        cfg: &GenerationConfig,
        rngs: &mut [ChaCha8Rng],
    ) -> Result<Vec<Generated>> {
        cfg.validate()?;
        if !rngs.is_empty() && rngs.len() != images.len() {
            return Err(Error::input(format!(
                "{} random streams for {} images",
                rngs.len(),
                images.len()
            )));
        }
        let prompt_ids = self.prompt_ids(prompt)?;
        let (ids, mask) = self.model.layout(&prompt_ids, 0, 0);
        let limit = self.model.lm_config().max_positions();
        if ids.len() + cfg.max_new_tokens > limit {
            return Err(Error::input(format!(
                "{} query and prompt positions plus {} new tokens exceed the language model's \
                 {limit} positions",
                ids.len(),
                cfg.max_new_tokens
            )));
        }
        let mut out = Vec::with_capacity(images.len());
        for (c, chunk) in images.chunks(BATCH).enumerate() {
            let prefix = self.image_prefix(chunk)?;
            let n = chunk.len();
            let rows = vec![ids.clone(); n];
            let embeds = self.model.inputs_embeds(&prefix, &rows)?;
            let history = vec![prompt_ids.clone(); n];
            let streams = if rngs.is_empty() {
                &mut []
            } else {
                &mut rngs[c * BATCH..c * BATCH + n]
            };
            let gens = generate(
                &self.model.lm,
                &embeds,
                &vec![mask.clone(); n],
                &history,
                cfg,
                streams,
            )?;
            for g in gens {
                let kept: Vec<u32> = g
                    .ids
                    .iter()
                    .copied()
                    .filter(|t| !cfg.stop.contains(t))
                    .collect();
                let text = self
                    .tokenizer
                    .decode(&kept, true)
                    .map_err(|e| Error::input(format!("cannot decode generated ids: {e}")))?;
                out.push(Generated {
                    text: text.trim().to_string(),
                    token_ids: g.ids,
                    score: g.score,
                });
            }
        }
        Ok(out)
    }
}
