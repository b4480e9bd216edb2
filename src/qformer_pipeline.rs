//! A Q-Former model directory ready for inference: the model, its tokenizer and image
//! preprocessing, and what the `itm`, `caption` and `retrieve` verbs compute with them — ITC
//! features, ITM match probabilities and ITG captions by greedy or beam search (BLIP-2 §3.2;
//! LAVIS `blip2_qformer.py` `generate` uses beam search over the same ITG head).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::data::image::{processor_for_dir, ImageProcessor, RgbImage};
use crate::data::text::{TextTokenizer, TokenBatch};
use crate::error::{Error, Result};
use crate::models::qformer::Blip2Qformer;
use crate::nn::ops::softmax_last;
use crate::objectives::itc::max_over_queries;
use crate::objectives::ops::log_softmax;

/// Images per forward pass of the image encoder.
const BATCH: usize = 64;

pub struct QformerPipeline {
    pub model: Blip2Qformer,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    /// [DEC]: starts every generated caption.
    pub dec_id: Option<u32>,
    pub dir: PathBuf,
    pub device: Device,
}

/// One generated caption with its mean token log-probability.
#[derive(Clone, Debug)]
pub struct Caption {
    pub text: String,
    pub ids: Vec<u32>,
    pub score: f32,
}

impl QformerPipeline {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "model directory {} does not exist",
                dir.display()
            )));
        }
        let model = Blip2Qformer::load(dir, device)?;
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
        Ok(Tensor::cat(&parts, 0)?)
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
        Ok(Tensor::cat(&parts, 0)?)
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
                "{} text(s) truncated to {} tokens, e.g. {first:?}",
                cut.len(),
                self.tokenizer.context()
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
        Ok(Tensor::cat(&parts, 0)?)
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
        Ok(Tensor::cat(&parts, 0)?)
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
    /// image-feature rows `image` (one per sequence).
    fn next_logprobs(&self, image: &Tensor, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let t = seqs[0].len();
        let ids = Tensor::new(seqs.to_vec(), &self.device)?;
        let mask = vec![vec![1u32; t]; seqs.len()];
        let logits = self.model.itg_logits(image, &ids, &mask)?;
        let last = logits.i((.., t - 1, ..))?.contiguous()?;
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

    fn finish(&self, ids: Vec<u32>, score: f32) -> Result<Caption> {
        Ok(Caption {
            text: self.tokenizer.decode(&ids)?,
            ids,
            score,
        })
    }

    /// Captions for image-feature rows `[N, tokens, E]`: greedy when `beams == 1`, else beam
    /// search keeping `beams` hypotheses and choosing by mean token log-probability.
    pub fn caption(
        &self,
        image_embeds: &Tensor,
        beams: usize,
        max_len: usize,
    ) -> Result<Vec<Caption>> {
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
        let n = image_embeds.dim(0)?;
        let mut out = Vec::with_capacity(n);
        if beams <= 1 {
            for s in (0..n).step_by(BATCH) {
                let k = BATCH.min(n - s);
                let img = image_embeds.narrow(0, s, k)?;
                out.extend(self.greedy(&img, dec, max_len)?);
            }
        } else {
            for i in 0..n {
                out.push(self.beam(&image_embeds.narrow(0, i, 1)?, dec, beams, max_len)?);
            }
        }
        Ok(out)
    }

    fn greedy(&self, image: &Tensor, dec: u32, max_len: usize) -> Result<Vec<Caption>> {
        let k = image.dim(0)?;
        let eos = self.eos();
        let mut seqs = vec![vec![dec]; k];
        let mut done = vec![false; k];
        let mut logp = vec![0f32; k];
        let mut lens = vec![0usize; k];
        for _ in 0..max_len {
            let lp = self.next_logprobs(image, &seqs)?;
            for (r, row) in lp.iter().enumerate() {
                let (best, &v) = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .expect("non-empty vocabulary");
                let tok = if done[r] {
                    eos.unwrap_or(best as u32)
                } else {
                    best as u32
                };
                if !done[r] {
                    logp[r] += v;
                    lens[r] += 1;
                    done[r] = Some(tok) == eos;
                }
                seqs[r].push(tok);
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        seqs.into_iter()
            .enumerate()
            .map(|(r, s)| {
                let ids: Vec<u32> = s[1..=lens[r]]
                    .iter()
                    .copied()
                    .filter(|&t| Some(t) != eos)
                    .collect();
                self.finish(ids, logp[r] / lens[r].max(1) as f32)
            })
            .collect()
    }

    fn beam(&self, image: &Tensor, dec: u32, beams: usize, max_len: usize) -> Result<Caption> {
        let eos = self.eos();
        // (tokens after [DEC], summed log-probability, finished)
        let mut hyps: Vec<(Vec<u32>, f32, bool)> = vec![(Vec::new(), 0.0, false)];
        let norm = |h: &(Vec<u32>, f32, bool)| h.1 / h.0.len().max(1) as f32;
        for _ in 0..max_len {
            let alive: Vec<usize> = (0..hyps.len()).filter(|&i| !hyps[i].2).collect();
            if alive.is_empty() {
                break;
            }
            let seqs: Vec<Vec<u32>> = alive
                .iter()
                .map(|&i| {
                    std::iter::once(dec)
                        .chain(hyps[i].0.iter().copied())
                        .collect()
                })
                .collect();
            let rows = image.repeat((alive.len(), 1, 1))?;
            let lp = self.next_logprobs(&rows, &seqs)?;
            let mut cands: Vec<(Vec<u32>, f32, bool)> =
                hyps.iter().filter(|h| h.2).cloned().collect();
            for (a, &i) in alive.iter().enumerate() {
                let mut order: Vec<usize> = (0..lp[a].len()).collect();
                order.sort_by(|&x, &y| lp[a][y].total_cmp(&lp[a][x]));
                for &tok in order.iter().take(beams) {
                    if !lp[a][tok].is_finite() {
                        continue;
                    }
                    let mut ids = hyps[i].0.clone();
                    ids.push(tok as u32);
                    let fin = Some(tok as u32) == eos;
                    cands.push((ids, hyps[i].1 + lp[a][tok], fin));
                }
            }
            cands.sort_by(|x, y| norm(y).total_cmp(&norm(x)));
            cands.truncate(beams);
            hyps = cands;
        }
        let best = hyps
            .into_iter()
            .max_by(|x, y| norm(x).total_cmp(&norm(y)))
            .expect("at least one hypothesis");
        let score = norm(&best);
        let ids = best.0.into_iter().filter(|&t| Some(t) != eos).collect();
        self.finish(ids, score)
    }
}

/// Row-wise top-k indices of a `[N, M]` score tensor, best first.
pub fn topk_rows(scores: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let s: Vec<Vec<f32>> = scores.to_dtype(DType::F32)?.to_vec2()?;
    Ok(s.iter()
        .map(|row| {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            idx.truncate(k);
            idx
        })
        .collect())
}
