//! One optimiser step of BLIP-2 stage 1, exact over the whole batch however it is cut up.
//!
//! ITC and the hard-negative draw of ITM couple every pair of the batch, so the step runs in two
//! passes (the gradient-cache scheme of Gao et al. 2021, as the CLIP task's accumulation):
//! 1. ITC features of every pair without a graph; the ITC loss over the whole batch gives the
//!    temperature's gradient and the loss gradient at each feature; the hard negatives are drawn
//!    from the whole batch's similarities (LAVIS `blip2_qformer.py`), never a caption known to
//!    be true of the image (see `caption_true_of` in mod.rs).
//! 2. Every micro-batch is split into [`SHARDS`] shards that run on parallel threads; a shard
//!    recomputes its features with a graph and backpropagates `features · cached gradient`, its
//!    ITM rows (its positives and both their negatives) and its ITG rows, each sum divided by
//!    the whole batch's count. The shards' gradients are added in shard order.
//!
//! The gradient equals that of ITC + ITM + ITG over the batch as one graph (up to float
//! summation order; `tests/qformer_training.rs`). Text is cut to the longest caption of each
//! shard: padding is masked out of attention and ignored by ITG, so it only costs time.
//! The shard count is fixed, not taken from the machine, so a seed gives the same run on any
//! number of cores.
//!
//! With several ranks (global.rs) every rank holds its part of each micro-batch: after pass 1
//! the ranks exchange features, image embeddings and texts, each computes ITC for its own rows
//! against the whole batch (the column gradients go back to their owners by reduce-scatter),
//! draws the same hard negatives from the global similarities, and runs pass 2 on its own pairs
//! with negatives from anywhere; the trainer sums the ranks' gradients.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Tensor, Var};

use super::global::{self, Global, LocalPart};
use super::{QformerDistill, QformerTask};
use crate::data::batch::{Batch, CaptionTruth};
use crate::dist::{self, Comm};
use crate::error::{Error, Result};
use crate::models::qformer::Blip2Qformer;
use crate::objectives::distill::{distilled_loss, hard_targets, mix_targets};
use crate::objectives::itc::{itc_loss, itc_loss_rows, max_over_queries};
use crate::objectives::itg::{decoder_ids, itg_loss_sum, itg_target_count};
use crate::objectives::itm::itm_loss_sum;
use crate::train::distill::FeatureQueues;
use crate::train::optim::{add_grads, Grads};
use crate::train::task::LossTerms;

/// A step's gradients, loss terms and, when distilling, the batch's momentum ITC features and
/// image ids (the queues take them once the step is done).
pub(super) type StepOutput = (Grads, LossTerms, Option<(Tensor, Tensor, Vec<u64>)>);

use crate::train::shards::SHARDS;

/// The texts of a step, and the frozen image features of its images.
struct StepRows {
    image: Tensor,
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
}

/// What pass 1 hands every shard.
struct Cached<'a> {
    rows: &'a StepRows,
    /// d ITC / d image feature `[B, Q, D]` and d ITC / d text feature `[B, D]` of this rank's
    /// pairs (all of them in one process).
    image_grad: Tensor,
    text_grad: Tensor,
    /// Hard negatives: for image i a text, for text j an image.
    text_for_image: Vec<usize>,
    image_for_text: Vec<usize>,
    /// Divisors that turn the shards' sums into the batch means: 3B ITM rows, ITG tokens.
    itm_rows: f64,
    itg_tokens: f64,
}

/// What [`QformerTask::finish_step`] takes from the first half of a step.
struct StepParts<'a> {
    step: u64,
    /// This rank's pairs.
    rows: &'a StepRows,
    /// Each micro-batch's pairs among `rows`.
    bounds: Vec<Range<usize>>,
    /// The ITC loss (this rank's part of it) over the features `img`, `txt` of `rows`.
    itc: Tensor,
    img: Var,
    txt: Var,
    /// With several ranks: the whole batch, its ITC feature columns, the ranks.
    global: Option<(Global, Var, Var, &'a dyn Comm)>,
    truths: &'a [Option<Arc<dyn CaptionTruth>>],
    momentum: Option<(Tensor, Tensor)>,
    image_ids: Vec<u64>,
}

/// The gradient this rank's features receive as ITC columns of every rank: the column
/// gradients `store` holds for `cols`, reduce-scattered back to the ranks that own the rows.
fn returned(
    comm: &dyn Comm,
    g: &Global,
    store: &candle_core::backprop::GradStore,
    cols: &Var,
) -> Result<Tensor> {
    let col = match store.get(cols.as_tensor()) {
        Some(x) => x.clone(),
        None => cols.as_tensor().zeros_like()?,
    };
    let dims = col.dims().to_vec();
    let per: usize = dims[1..].iter().product();
    let order = Tensor::new(
        g.by_rank.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        col.device(),
    )?;
    let send: Vec<f32> = crate::nn::host::flat(&col.index_select(&order, 0)?)?;
    let segments: Vec<usize> = g.per_rank.iter().map(|n| n * per).collect();
    let mine = dist::reduce_scatter_sum(comm, &send, &segments)?;
    let mut shape = dims;
    shape[0] = g.per_rank[comm.rank()];
    Ok(Tensor::from_vec(mine, shape, col.device())?.to_dtype(col.dtype())?)
}

/// `rows` cut to the longest text among them (at least 2 positions, as ITG needs): the ids
/// and masks of those rows. Rows of different micro-batches come padded to different lengths
/// (each is tokenised on its own); a shorter one is padded further with masked zeros.
fn trimmed(ids: &[&Vec<u32>], mask: &[&Vec<u32>]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let len = mask
        .iter()
        .map(|m| m.iter().rposition(|&x| x == 1).map_or(0, |p| p + 1))
        .max()
        .unwrap_or(0)
        .max(2);
    let cut = |rows: &[&Vec<u32>]| -> Vec<Vec<u32>> {
        rows.iter()
            .map(|r| {
                let mut v = r[..len.min(r.len())].to_vec();
                v.resize(len, 0);
                v
            })
            .collect()
    };
    (cut(ids), cut(mask))
}

impl QformerTask {
    /// ITC features `([n, Q, D], [n, D])` of `range`, with a graph.
    fn itc_features(&self, rows: &StepRows, range: Range<usize>) -> Result<(Tensor, Tensor)> {
        itc_features_of(&self.model, rows, range, &self.parts.device)
    }

    /// One shard's gradients and its shares of the ITM and ITG losses: the pairs `range` of
    /// `c.rows`, whose cached ITC gradients start at row `grad_at`.
    fn shard_grads(
        &self,
        c: &Cached,
        range: Range<usize>,
        grad_at: usize,
    ) -> Result<(Grads, Tensor, Tensor)> {
        let rows = c.rows;
        let (n, start) = (range.len(), range.start);
        // ITC: the cached gradient pulled back through the live features.
        let (img, txt) = self.itc_features(rows, range.clone())?;
        let itc = ((img * c.image_grad.narrow(0, grad_at, n)?)?.sum_all()?
            + (txt * c.text_grad.narrow(0, grad_at, n)?)?.sum_all()?)?;

        // ITM: this shard's positives, the hard-negative image of each of its texts and the
        // hard-negative text of each of its images, labelled 1, 0, 0.
        let mut image_of = Vec::with_capacity(3 * n);
        let mut text_of = Vec::with_capacity(3 * n);
        let mut labels = Vec::with_capacity(3 * n);
        for i in range.clone() {
            image_of.extend([i, c.image_for_text[i], i]);
            text_of.extend([i, i, c.text_for_image[i]]);
            labels.extend([1u32, 0, 0]);
        }
        let ids: Vec<&Vec<u32>> = text_of.iter().map(|&j| &rows.ids[j]).collect();
        let mask: Vec<&Vec<u32>> = text_of.iter().map(|&j| &rows.mask[j]).collect();
        let (ids, mask) = trimmed(&ids, &mask);
        let idx = Tensor::new(
            image_of.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &self.parts.device,
        )?;
        let logits = self.model.itm_logits(
            &rows.image.index_select(&idx, 0)?,
            &Tensor::new(ids, &self.parts.device)?,
            &mask,
        )?;
        let itm = (itm_loss_sum(&logits, &labels)? / c.itm_rows)?;

        // ITG: [DEC] replaces [CLS]; decode through the multimodal causal mask.
        let ids: Vec<&Vec<u32>> = rows.ids[range.clone()].iter().collect();
        let mask: Vec<&Vec<u32>> = rows.mask[range.clone()].iter().collect();
        let (ids, mask) = trimmed(&ids, &mask);
        let dec = decoder_ids(&ids, self.dec_id);
        let itg_logits = self.model.itg_logits(
            &rows.image.narrow(0, start, n)?,
            &Tensor::new(dec.clone(), &self.parts.device)?,
            &mask,
        )?;
        let itg = (itg_loss_sum(&itg_logits, &dec, &mask)?.0 / c.itg_tokens)?;

        let total = ((itc + &itm)? + &itg)?;
        let mut grads = Grads::new();
        self.parts.collect(&total.backward()?, &mut grads)?;
        // The terms stay on the device: the step reads all three in one go.
        let term = |t: &Tensor| t.detach().to_dtype(candle_core::DType::F32);
        Ok((grads, term(&itm)?, term(&itg)?))
    }

    /// The gradient of ITC + ITM + ITG over all of `micro` (one batch of their concatenation)
    /// and the three terms.
    pub(super) fn step_grads(&self, micro: &[Batch], step: u64) -> Result<StepOutput> {
        let mut images = Vec::with_capacity(micro.len());
        let mut bounds = Vec::with_capacity(micro.len());
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        // The frozen tower's features, and after the trained `ln_vision`.
        let mut hidden = Vec::with_capacity(micro.len());
        for b in micro {
            let h = self
                .model
                .image_hidden(&b.pixel_tensor(&self.parts.device)?)?;
            images.push(self.model.ln_vision(&h)?);
            hidden.push(h.detach());
            bounds.push(ids.len()..ids.len() + b.len());
            ids.extend(b.tokens.ids.iter().cloned());
            mask.extend(b.tokens.mask.iter().cloned());
        }
        let n = ids.len();
        let comm = self.parts.comm.clone();
        if n < 2 && comm.size() == 1 {
            return Err(Error::input(format!(
                "a Q-Former step needs at least 2 pairs (ITC and ITM contrast them), got {n}"
            )));
        }
        let rows = StepRows {
            image: Tensor::cat(&images, 0)?,
            ids,
            mask,
        };

        // Pass 1: features of every pair, no graph kept; ITC over the whole batch.
        let mut img_parts = Vec::with_capacity(bounds.len());
        let mut txt_parts = Vec::with_capacity(bounds.len());
        for r in &bounds {
            let (img, txt) = self.itc_features(&rows, r.clone())?;
            img_parts.push(img.detach());
            txt_parts.push(txt.detach());
        }
        let truths: Vec<Option<Arc<dyn CaptionTruth>>> = micro
            .iter()
            .flat_map(|b| b.truths.iter().cloned())
            .collect();
        // Several ranks: the whole batch from every rank's parts.
        let global = match comm.size() {
            1 => None,
            _ => {
                let parts: Vec<LocalPart> = bounds
                    .iter()
                    .enumerate()
                    .map(|(j, r)| LocalPart {
                        hidden: hidden[j].clone(),
                        ids: &rows.ids[r.clone()],
                        mask: &rows.mask[r.clone()],
                        img: img_parts[j].clone(),
                        txt: txt_parts[j].clone(),
                        truths: &truths[r.clone()],
                    })
                    .collect();
                Some(global::exchange(comm.as_ref(), &parts, &self.parts.device)?)
            }
        };
        let img = Var::from_tensor(&Tensor::cat(&img_parts, 0)?)?;
        let txt = Var::from_tensor(&Tensor::cat(&txt_parts, 0)?)?;
        let temp = self.temp.as_tensor();
        let image_ids: Vec<u64> = micro
            .iter()
            .flat_map(|b| b.image_ids.iter().copied())
            .collect();
        let (itc, momentum, global) = match (&self.distill, global) {
            (Some(d), _) => {
                let (loss, m) =
                    self.distilled_itc(d, &rows, &bounds, &img, &txt, &image_ids, step)?;
                (loss, Some(m), None)
            }
            (None, None) => (
                itc_loss(img.as_tensor(), txt.as_tensor(), temp)?,
                None,
                None,
            ),
            (None, Some(g)) => {
                let (cols_img, cols_txt) = (Var::from_tensor(&g.img)?, Var::from_tensor(&g.txt)?);
                let targets: Vec<usize> = g.mine.iter().flat_map(|r| r.clone()).collect();
                let loss = itc_loss_rows(&img, &txt, &cols_img, &cols_txt, &targets, temp)?;
                (loss, None, Some((g, cols_img, cols_txt, comm.as_ref())))
            }
        };
        self.finish_step(StepParts {
            step,
            rows: &rows,
            bounds,
            itc,
            img,
            txt,
            global,
            truths: &truths,
            momentum,
            image_ids,
        })
    }

    /// Everything after the ITC loss: its gradients (returned to their owner ranks), the hard
    /// negatives, and pass 2 over this rank's pairs.
    fn finish_step(&self, mut s: StepParts) -> Result<StepOutput> {
        let itc_grads = s.itc.backward()?;
        let mut grads = Grads::new();
        self.parts.collect(&itc_grads, &mut grads)?;
        let missing = || Error::input("ITC gave no gradient for its features");
        let mut image_grad = itc_grads
            .get(s.img.as_tensor())
            .ok_or_else(missing)?
            .clone();
        let mut text_grad = itc_grads
            .get(s.txt.as_tensor())
            .ok_or_else(missing)?
            .clone();
        if let Some((g, cols_img, cols_txt, comm)) = &s.global {
            // This rank's features are columns of every rank's ITC: their gradients come back.
            image_grad = (image_grad + returned(*comm, g, &itc_grads, cols_img)?)?;
            text_grad = (text_grad + returned(*comm, g, &itc_grads, cols_txt)?)?;
        }
        // The whole batch's pairs: this rank's, or every rank's.
        let gathered;
        let (sim_img, sim_txt, all_truths, all_rows) = match s.global.as_mut() {
            Some((g, ..)) => {
                // `ln_vision` is trained and replicated: each rank applies it to every image it
                // uses, so its gradient through any rank's image adds up over the ranks.
                gathered = StepRows {
                    image: self.model.ln_vision(&g.hidden)?,
                    ids: std::mem::take(&mut g.ids),
                    mask: std::mem::take(&mut g.mask),
                };
                let truths = g.truths.iter().collect::<Vec<_>>();
                (g.img.clone(), g.txt.clone(), truths, &gathered)
            }
            None => (
                s.img.as_tensor().clone(),
                s.txt.as_tensor().clone(),
                s.truths.iter().collect(),
                s.rows,
            ),
        };
        // ITM's hard negatives, drawn from the whole batch's ITC similarities.
        let (text_for_image, image_for_text) =
            self.hard_negatives(&sim_img, &sim_txt, &all_truths, s.step)?;
        let cached = Cached {
            itg_tokens: itg_target_count(&all_rows.mask).max(1) as f64,
            itm_rows: (3 * all_rows.ids.len()) as f64,
            rows: all_rows,
            image_grad,
            text_grad,
            text_for_image,
            image_for_text,
        };
        // This rank's pairs of each micro-batch, where they sit among all pairs, and where
        // their cached ITC gradients start.
        let work: Vec<(Range<usize>, usize)> = match &s.global {
            Some((g, ..)) => g
                .mine
                .iter()
                .zip(&s.bounds)
                .map(|(m, b)| (m.clone(), b.start))
                .collect(),
            None => s.bounds.iter().map(|b| (b.clone(), b.start)).collect(),
        };

        // Pass 2: each micro-batch's shards in parallel, summed in order.
        let zero = || Tensor::zeros((), candle_core::DType::F32, &self.parts.device);
        let (mut itm, mut itg) = (zero()?, zero()?);
        for (r, at) in work {
            let shards: Vec<(Range<usize>, usize)> = (0..SHARDS)
                .map(|k| r.start + r.len() * k / SHARDS..r.start + r.len() * (k + 1) / SHARDS)
                .filter(|s| !s.is_empty())
                .map(|s| (s.clone(), at + s.start - r.start))
                .collect();
            let results = crate::train::shards::run("Q-Former", &shards, |(s, g)| {
                self.shard_grads(&cached, s.clone(), *g)
            })?;
            for res in results {
                let (g, m, t) = res?;
                add_grads(&mut grads, g)?;
                itm = (itm + m)?;
                itg = (itg + t)?;
            }
        }
        // One host read for the three terms (summed over shards in order, in float32).
        let itc = s.itc.detach().to_dtype(candle_core::DType::F32)?;
        let terms: Vec<f32> = crate::nn::host::flat(&Tensor::stack(&[itc, itm, itg], 0)?)?;
        let (itc, itm, itg) = (terms[0], terms[1], terms[2]);
        let momentum = s.momentum.map(|(i, t)| (i, t, s.image_ids));
        Ok((
            grads,
            LossTerms {
                total: itc + itm + itg,
                parts: vec![
                    ("itc".into(), itc),
                    ("itm".into(), itm),
                    ("itg".into(), itg),
                ],
            },
            momentum,
        ))
    }

    /// ITC with momentum distillation (ALBEF §3.3 on BLIP-2's max-over-queries similarity): the
    /// momentum Q-Former's features of the batch and the queues are the columns; the targets mix
    /// the momentum similarities' softmax with the hard labels; no label smoothing (the soft
    /// targets take its place, as in BLIP). Returns the loss over the online features `img`,
    /// `txt` and the batch's momentum features, for the queues.
    #[allow(clippy::too_many_arguments)]
    fn distilled_itc(
        &self,
        d: &QformerDistill,
        rows: &StepRows,
        bounds: &[Range<usize>],
        img: &Var,
        txt: &Var,
        ids: &[u64],
        step: u64,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let dev = &self.parts.device;
        let (mut im, mut tm) = (Vec::new(), Vec::new());
        for r in bounds {
            let (i, t) = itc_features_of(&d.model, rows, r.clone(), dev)?;
            im.push(i.detach());
            tm.push(t.detach());
        }
        let (img_m, txt_m) = (Tensor::cat(&im, 0)?, Tensor::cat(&tm, 0)?);
        let q = &d.state.queues;
        let image_cols = FeatureQueues::columns(&img_m, &q.image)?;
        let text_cols = FeatureQueues::columns(&txt_m, &q.text)?;
        let temp = self.temp.as_tensor();
        let temp_m = temp.detach();
        let hard = hard_targets(ids, &q.ids, d.state.spec.same_image_targets, dev)?;
        let alpha = d.state.alpha(step);
        let sim_i2t_m = max_over_queries(&img_m, &text_cols)?.broadcast_div(&temp_m)?;
        let sim_t2i_m = max_over_queries(&image_cols, &txt_m)?
            .t()?
            .broadcast_div(&temp_m)?;
        let t_i2t = mix_targets(&sim_i2t_m, alpha, &hard)?;
        let t_t2i = mix_targets(&sim_t2i_m, alpha, &hard)?;
        let sim_i2t = max_over_queries(img.as_tensor(), &text_cols)?.broadcast_div(temp)?;
        let sim_t2i = max_over_queries(&image_cols, txt.as_tensor())?
            .t()?
            .broadcast_div(temp)?;
        let loss = distilled_loss(&sim_i2t, &sim_t2i, &t_i2t, &t_t2i, ids.len())?;
        Ok((loss, (img_m, txt_m)))
    }
}

/// ITC features `([n, Q, D], [n, D])` of `range` under `model` (the trained Q-Former or its
/// momentum copy), with a graph.
fn itc_features_of(
    model: &Blip2Qformer,
    rows: &StepRows,
    range: Range<usize>,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let ids: Vec<&Vec<u32>> = rows.ids[range.clone()].iter().collect();
    let mask: Vec<&Vec<u32>> = rows.mask[range.clone()].iter().collect();
    let (ids, mask) = trimmed(&ids, &mask);
    let image = rows.image.narrow(0, range.start, range.len())?;
    let img = model.itc_image_features(&model.query_output(&image)?)?;
    let txt = model.itc_text_features(&model.text_output(&Tensor::new(ids, device)?, &mask)?)?;
    Ok((img, txt))
}
