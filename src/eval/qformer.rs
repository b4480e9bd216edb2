//! Q-Former evaluation (BLIP-2 §4; LAVIS `blip2.py` `compute_sim_matrix`): retrieval by ITC
//! alone and with the ITC top-k reranked by ITM (final score = ITM match logit + ITC cosine, as
//! LAVIS), and captioning scored on shapes by the share of colour and shape words that are
//! right on single-object images.

use serde::Serialize;

use super::report::EvalSet;
use super::retrieval::{from_scores, from_similarity, RetrievalMetrics};
use crate::data::image::RgbImage;
use crate::data::shapes::{self, COLORS, SHAPES};
use crate::error::{Error, Result};
use crate::infer::QformerPipeline;

#[derive(Clone, Debug, Serialize)]
pub struct QformerRetrieval {
    pub itc: RetrievalMetrics,
    pub itm_reranked: RetrievalMetrics,
    /// Candidates reranked per query.
    pub k: usize,
}

/// Score given to candidates outside the reranked top-k (LAVIS: −100).
const OUTSIDE: f32 = -100.0;

/// Retrieval over pairs (image i with caption i), by ITC and with ITC's top-`k` reranked by ITM.
pub fn retrieval(
    p: &QformerPipeline,
    images: &[RgbImage],
    captions: &[String],
    k: usize,
) -> Result<QformerRetrieval> {
    let n = images.len();
    if n == 0 || n != captions.len() {
        return Err(Error::input(format!(
            "retrieval needs as many captions as images ({n} images, {} captions)",
            captions.len()
        )));
    }
    let k = k.clamp(1, n);
    let emb = p.image_embeds(images)?;
    let sims = p.itc_scores(&p.itc_image(&emb)?, &p.itc_text(captions)?)?;
    let s: Vec<Vec<f32>> = sims.to_vec2()?;
    let itc = from_similarity(&s);

    let mut i2t = vec![vec![OUTSIDE; n]; n];
    for (i, row) in s.iter().enumerate() {
        for r in p.rerank(&emb, row, k, |j| (i, captions[j].as_str()))? {
            i2t[i][r.index] = r.score;
        }
    }
    let mut t2i = vec![vec![OUTSIDE; n]; n];
    for (j, caption) in captions.iter().enumerate() {
        let column: Vec<f32> = s.iter().map(|row| row[j]).collect();
        for r in p.rerank(&emb, &column, k, |i| (i, caption.as_str()))? {
            t2i[j][r.index] = r.score;
        }
    }
    Ok(QformerRetrieval {
        itc,
        itm_reranked: from_scores(&i2t, &t2i),
        k,
    })
}

/// The colour and shape words of a caption (the first of each that appears).
pub fn colour_and_shape(caption: &str) -> (Option<String>, Option<String>) {
    let words: Vec<String> = caption
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect();
    let colour = words
        .iter()
        .find(|w| COLORS.iter().any(|c| c.0 == w.as_str()))
        .cloned();
    let shape = words.iter().find(|w| SHAPES.contains(&w.as_str())).cloned();
    (colour, shape)
}

/// Share of colour and shape words that are right against `(colour, shape)` truths: each
/// single-object image contributes two checks (its caption's colour word is the object's colour;
/// its shape word is the object's shape); a missing word counts as wrong.
pub fn word_accuracy(captions: &[String], truths: &[(String, String)]) -> f64 {
    let mut right = 0usize;
    for (c, (tc, ts)) in captions.iter().zip(truths) {
        let (colour, shape) = colour_and_shape(c);
        right += usize::from(colour.as_deref() == Some(tc.as_str()));
        right += usize::from(shape.as_deref() == Some(ts.as_str()));
    }
    right as f64 / (2 * captions.len().max(1)) as f64
}

/// Captions of image features `emb` (greedy when `beams == 1`) and their [`word_accuracy`].
pub fn caption_accuracy(
    p: &QformerPipeline,
    emb: &candle_core::Tensor,
    truths: &[(String, String)],
    beams: usize,
    max_len: usize,
) -> Result<(f64, Vec<String>)> {
    let texts: Vec<String> = p
        .caption(emb, beams, max_len)?
        .into_iter()
        .map(|c| c.text)
        .collect();
    Ok((word_accuracy(&texts, truths), texts))
}

/// What `vlalign eval --json` prints for a Q-Former directory. Caption figures are the share of
/// colour and shape words that are right, on single-object images of seen shapes compositions
/// and of held-out ones; absent when the set has no such image.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QformerReport {
    pub n_images: usize,
    pub n_skipped: usize,
    /// Candidates reranked per query.
    pub k: usize,
    pub itc: RetrievalMetrics,
    pub itm_reranked: RetrievalMetrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_seen_greedy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_seen_beam: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_caption_seen: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_unseen_greedy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_unseen_beam: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_caption_unseen: Option<usize>,
}

/// Single-object images and the (colour, shape) of each.
pub type CaptionGroup = (Vec<RgbImage>, Vec<(String, String)>);

/// The single-object images of a set whose class is "COLOUR SHAPE", split into seen
/// compositions and the held-out ones (`shapes::is_held_out`), each with its truths.
pub fn caption_groups(set: &EvalSet) -> [CaptionGroup; 2] {
    let mut groups: [CaptionGroup; 2] = Default::default();
    for (img, class) in set.images.iter().zip(&set.classes) {
        let Some((c, sh)) = class.as_deref().and_then(|c| c.split_once(' ')) else {
            continue;
        };
        let g = usize::from(shapes::is_held_out(c, sh));
        groups[g].0.push(img.clone());
        groups[g].1.push((c.to_string(), sh.to_string()));
    }
    groups
}

/// (greedy, beam) caption word accuracy and the image count of a group; `None` when it is empty.
fn group_scores(
    p: &QformerPipeline,
    (images, truths): &CaptionGroup,
    beams: usize,
    max_len: usize,
) -> Result<Option<(f64, f64, usize)>> {
    if images.is_empty() {
        return Ok(None);
    }
    let emb = p.image_embeds(images)?;
    let greedy = caption_accuracy(p, &emb, truths, 1, max_len)?.0;
    let beam = caption_accuracy(p, &emb, truths, beams, max_len)?.0;
    Ok(Some((greedy, beam, images.len())))
}

/// Retrieval by ITC and ITM-reranked over every pair of `set`, and caption word accuracy
/// (greedy and `beams`-wide beam search, at most `max_len` tokens) on its single-object images.
pub fn evaluate(
    p: &QformerPipeline,
    set: &EvalSet,
    rerank_k: usize,
    beams: usize,
    max_len: usize,
) -> Result<QformerReport> {
    let r = retrieval(p, &set.images, &set.captions, rerank_k)?;
    let mut report = QformerReport {
        n_images: set.images.len(),
        n_skipped: set.skipped.len(),
        k: r.k,
        itc: r.itc,
        itm_reranked: r.itm_reranked,
        ..Default::default()
    };
    let [seen, unseen] = caption_groups(set);
    if let Some((greedy, beam, n)) = group_scores(p, &seen, beams, max_len)? {
        report.caption_seen_greedy = Some(greedy);
        report.caption_seen_beam = Some(beam);
        report.n_caption_seen = Some(n);
    }
    if let Some((greedy, beam, n)) = group_scores(p, &unseen, beams, max_len)? {
        report.caption_unseen_greedy = Some(greedy);
        report.caption_unseen_beam = Some(beam);
        report.n_caption_unseen = Some(n);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(color: &str, shape: &str) -> (String, String) {
        (color.into(), shape.into())
    }

    #[test]
    fn word_accuracy_counts_colour_and_shape_separately() {
        let caps = vec![
            "a large red circle on the left".to_string(), // both right
            "left: a big blue circle".to_string(),        // colour wrong
            "a small object".to_string(),                 // both missing
        ];
        let objs = vec![
            obj("red", "circle"),
            obj("red", "circle"),
            obj("green", "star"),
        ];
        assert_eq!(word_accuracy(&caps, &objs), 3.0 / 6.0);
    }
}
