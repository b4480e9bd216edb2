//! A Q-Former model directory ready for inference: the model, its tokenizer and image
//! preprocessing, and what the `itm`, `caption` and `retrieve` verbs compute with them — ITC
//! features and scores, ITM logits and match probabilities (BLIP-2 §3.2). Captions are in
//! generate.rs, ITM reranking in rank.rs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::data::image::{processor_for_dir, ImageProcessor, RgbImage};
use crate::data::text::{TextTokenizer, TokenBatch};
use crate::error::{Error, Result};
use crate::models::qformer::Blip2Qformer;
use crate::models::ModelDir;
use crate::nn::ops::{ensure_finite, softmax_last};
use crate::objectives::itc::max_over_queries;
use crate::objectives::ops::log_softmax;

use super::generate::{self, Generated};

/// Images (or texts, or pairs) per forward pass.
pub(super) const BATCH: usize = 64;

pub struct QformerPipeline {
    pub model: Blip2Qformer,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    /// [DEC]: starts every generated caption.
    pub dec_id: Option<u32>,
    pub dir: PathBuf,
    pub device: Device,
}

impl QformerPipeline {
    /// Loads a Q-Former model directory; any other kind is an error.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_dir(&ModelDir::open(dir)?, device)
    }

    /// Loads an opened model directory, which must hold a Q-Former.
    pub fn from_dir(md: &ModelDir, device: &Device) -> Result<Self> {
        let dir = md.path.as_path();
        let model = Blip2Qformer::load_weights(dir, md.qformer("the Q-Former pipeline")?, device)?;
        let q = &model.config().qformer;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::input(format!(
                "{}: no tokenizer.json (a Q-Former directory needs its text tokenizer)",
                dir.display()
            )));
        }
        let tokenizer = TextTokenizer::from_file(&tok_path, q.max_position_embeddings)?;
        let size = model.config().vision.image_size();
        let processor = match processor_for_dir(dir)? {
            Some((p, _)) => p,
            None => ImageProcessor::clip_default(size),
        };
        Ok(Self {
            dec_id: q.bos_token_id,
            model,
            tokenizer,
            processor,
            dir: dir.to_path_buf(),
            device: device.clone(),
        })
    }

    /// Preprocessed pixels `[N, 3, H, W]`.
    pub fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        Ok(crate::data::image::pixel_tensor(
            &self.processor,
            images,
            &self.device,
        )?)
    }

    /// Frozen image features `[N, tokens, E]`, batched.
    pub fn image_embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in images.chunks(BATCH) {
            parts.push(self.model.image_embeds(&self.pixels(chunk)?)?);
        }
        let t = Tensor::cat(&parts, 0)?;
        ensure_finite(&t, &format!("{}: image features", self.dir.display()))?;
        Ok(t)
    }

    /// ITC image features `[N, Q, D]` (normalised) from image features.
    pub fn itc_image(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let n = image_embeds.dim(0)?;
        let mut parts = Vec::new();
        for s in (0..n).step_by(BATCH) {
            let e = image_embeds.narrow(0, s, BATCH.min(n - s))?;
            parts.push(
                self.model
                    .itc_image_features(&self.model.query_output(&e)?)?,
            );
        }
        let t = Tensor::cat(&parts, 0)?;
        ensure_finite(&t, &format!("{}: ITC image features", self.dir.display()))?;
        Ok(t)
    }

    /// Tokenises with truncation to the model's context; truncated texts are reported once per
    /// call (the first and how many), not once per text.
    pub fn tokens<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        let enc = self.tokenizer.encode(texts)?;
        let cut: Vec<&str> = texts
            .iter()
            .zip(&enc.truncated)
            .filter(|(_, c)| **c)
            .map(|(t, _)| t.as_ref())
            .collect();
        if let Some(first) = cut.first() {
            tracing::warn!(
                "{} text(s) truncated to {} tokens, e.g. {:?}",
                cut.len(),
                self.tokenizer.context(),
                super::short(first)
            );
        }
        Ok(enc.batch)
    }

    /// ITC text features `[N, D]` (normalised [CLS] projections).
    pub fn itc_text<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in texts.chunks(BATCH) {
            let b = self.tokens(chunk)?;
            let ids = Tensor::new(b.ids.clone(), &self.device)?;
            parts.push(
                self.model
                    .itc_text_features(&self.model.text_output(&ids, &b.mask)?)?,
            );
        }
        let t = Tensor::cat(&parts, 0)?;
        ensure_finite(&t, &format!("{}: ITC text features", self.dir.display()))?;
        Ok(t)
    }

    /// ITC scores `[Ni, Nt]`: cosine maximised over queries, no temperature (as HF returns it).
    pub fn itc_scores(&self, itc_image: &Tensor, itc_text: &Tensor) -> Result<Tensor> {
        Ok(max_over_queries(itc_image, itc_text)?)
    }

    /// ITM logits `[N, 2]` for image-feature rows paired with `texts`.
    pub fn itm_logits<S: AsRef<str>>(&self, image_embeds: &Tensor, texts: &[S]) -> Result<Tensor> {
        let mut parts = Vec::new();
        let n = texts.len();
        for s in (0..n).step_by(BATCH) {
            let k = BATCH.min(n - s);
            let b = self.tokens(&texts[s..s + k])?;
            let ids = Tensor::new(b.ids.clone(), &self.device)?;
            let e = image_embeds.narrow(0, s, k)?;
            parts.push(self.model.itm_logits(&e, &ids, &b.mask)?);
        }
        let t = Tensor::cat(&parts, 0)?;
        ensure_finite(&t, &format!("{}: ITM logits", self.dir.display()))?;
        Ok(t)
    }

    /// ITM match logits (class 1, LAVIS's rerank score) of `(image row, text)` pairs, the image
    /// rows indexing `image_embeds`.
    pub fn match_logits(&self, image_embeds: &Tensor, pairs: &[(usize, &str)]) -> Result<Vec<f32>> {
        let idx = Tensor::new(
            pairs.iter().map(|&(i, _)| i as u32).collect::<Vec<_>>(),
            image_embeds.device(),
        )?;
        let texts: Vec<&str> = pairs.iter().map(|&(_, t)| t).collect();
        let logits = self.itm_logits(&image_embeds.index_select(&idx, 0)?, &texts)?;
        Ok(logits.i((.., 1))?.to_vec1()?)
    }

    /// ITM match probabilities (softmax, class 1) for image-feature rows paired with `texts`.
    pub fn itm_probs<S: AsRef<str>>(&self, image_embeds: &Tensor, texts: &[S]) -> Result<Vec<f32>> {
        let p = softmax_last(&self.itm_logits(image_embeds, texts)?)?;
        Ok(p.i((.., 1))?.to_vec1()?)
    }

    /// Tokens never generated: padding, unknown, the start tokens, [MASK] and [DEC].
    fn banned(&self) -> Vec<u32> {
        let mut b: Vec<u32> = [
            "<|pad|>",
            "<|unk|>",
            "<|startoftext|>",
            "[PAD]",
            "[UNK]",
            "[CLS]",
            "[MASK]",
        ]
        .iter()
        .filter_map(|t| self.tokenizer.token_to_id(t))
        .collect();
        b.extend(self.dec_id);
        b
    }

    fn eos(&self) -> Option<u32> {
        ["<|endoftext|>", "[SEP]"]
            .iter()
            .find_map(|t| self.tokenizer.token_to_id(t))
    }

    /// Next-token log-probabilities `[B, V]` after `seqs` (each starting with [DEC]) for the
    /// image-feature rows `image` (one per sequence), banned tokens at −∞.
    fn next_logprobs(&self, image: &Tensor, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let t = seqs[0].len();
        let ids = Tensor::new(seqs.to_vec(), &self.device)?;
        let mask = vec![vec![1u32; t]; seqs.len()];
        let logits = self.model.itg_logits(image, &ids, &mask)?;
        let last = logits.i((.., t - 1, ..))?.contiguous()?;
        ensure_finite(&last, &format!("{}: ITG logits", self.dir.display()))?;
        let mut lp: Vec<Vec<f32>> = log_softmax(&last)?.to_dtype(DType::F32)?.to_vec2()?;
        let banned = self.banned();
        for row in &mut lp {
            for &b in &banned {
                if let Some(x) = row.get_mut(b as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        Ok(lp)
    }

    fn finish(&self, g: Generated) -> Result<Caption> {
        Ok(Caption {
            text: self.tokenizer.decode(&g.ids)?,
            ids: g.ids,
            score: g.score,
        })
    }

    /// What every decoding needs: [DEC] (the start token), end-of-text, and `max_len` within the
    /// model's positions; an error when the directory cannot caption.
    fn decoding(&self, max_len: usize) -> Result<(u32, Option<u32>, usize)> {
        let dec = self.dec_id.ok_or_else(|| {
            Error::input(format!(
                "{}: qformer_config has no bos_token_id ([DEC]); this directory was not trained for captioning",
                self.dir.display()
            ))
        })?;
        if !self.model.has_lm_head() {
            return Err(Error::input(format!(
                "{}: no ITG head (cls.predictions.*) to caption with",
                self.dir.display()
            )));
        }
        let max_len = max_len
            .min(self.model.config().qformer.max_position_embeddings - 1)
            .max(1);
        Ok((dec, self.eos(), max_len))
    }

    /// Captions from the ITG head for image-feature rows `[N, tokens, E]`: greedy when
    /// `beams == 1`, else beam search keeping `beams` hypotheses (generate.rs).
    pub fn caption(
        &self,
        image_embeds: &Tensor,
        beams: usize,
        max_len: usize,
    ) -> Result<Vec<Caption>> {
        let (dec, eos, max_len) = self.decoding(max_len)?;
        let n = image_embeds.dim(0)?;
        let mut out = Vec::with_capacity(n);
        if beams <= 1 {
            for s in (0..n).step_by(BATCH) {
                let k = BATCH.min(n - s);
                let img = image_embeds.narrow(0, s, k)?;
                let next = |seqs: &[Vec<u32>]| self.next_logprobs(&img, seqs);
                for g in generate::greedy(k, dec, eos, max_len, next)? {
                    out.push(self.finish(g)?);
                }
            }
        } else {
            for i in 0..n {
                let img = image_embeds.narrow(0, i, 1)?;
                let next =
                    |seqs: &[Vec<u32>]| self.next_logprobs(&img.repeat((seqs.len(), 1, 1))?, seqs);
                out.push(self.finish(generate::beam(dec, eos, beams, max_len, next)?)?);
            }
        }
        Ok(out)
    }

    /// Captions sampled from the ITG head with nucleus sampling (`generate::nucleus`; BLIP's
    /// CapFilt captioner): image-feature row i draws from `rngs[i]`.
    pub fn caption_sampled(
        &self,
        image_embeds: &Tensor,
        top_p: f32,
        max_len: usize,
        min_len: usize,
        rngs: &mut [rand_chacha::ChaCha8Rng],
    ) -> Result<Vec<Caption>> {
        let (dec, eos, max_len) = self.decoding(max_len)?;
        let n = image_embeds.dim(0)?;
        if rngs.len() != n {
            return Err(Error::input(format!(
                "{} random streams for {n} images",
                rngs.len()
            )));
        }
        let mut out = Vec::with_capacity(n);
        for s in (0..n).step_by(BATCH) {
            let k = BATCH.min(n - s);
            let img = image_embeds.narrow(0, s, k)?;
            let next = |seqs: &[Vec<u32>]| self.next_logprobs(&img, seqs);
            let rows = &mut rngs[s..s + k];
            for g in generate::nucleus(dec, eos, max_len, min_len, top_p, rows, next)? {
                out.push(self.finish(g)?);
            }
        }
        Ok(out)
    }
}

/// One generated caption with its mean token log-probability.
#[derive(Clone, Debug)]
pub struct Caption {
    pub text: String,
    pub ids: Vec<u32>,
    pub score: f32,
}
