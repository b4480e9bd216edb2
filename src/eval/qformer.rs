//! Q-Former evaluation (BLIP-2 §4; LAVIS `blip2.py` `compute_sim_matrix`): retrieval by ITC
//! alone and with the ITC top-k reranked by ITM (final score = ITM match logit + ITC cosine, as
//! LAVIS), and captioning scored on shapes by the share of colour and shape words that are
//! right on single-object images.

use serde::Serialize;

use super::retrieval::{from_scores, from_similarity, RetrievalMetrics};
use crate::data::image::RgbImage;
use crate::data::shapes::{COLORS, SHAPES};
use crate::error::{Error, Result};
use crate::qformer_pipeline::{topk_rows, QformerPipeline};

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
    for (i, top) in topk_rows(&sims, k)?.into_iter().enumerate() {
        let pairs: Vec<(usize, &str)> = top.iter().map(|&j| (i, captions[j].as_str())).collect();
        for (&j, m) in top.iter().zip(p.match_logits(&emb, &pairs)?) {
            i2t[i][j] = m + s[i][j];
        }
    }
    let mut t2i = vec![vec![OUTSIDE; n]; n];
    for (j, top) in topk_rows(&sims.t()?.contiguous()?, k)?
        .into_iter()
        .enumerate()
    {
        let pairs: Vec<(usize, &str)> = top.iter().map(|&i| (i, captions[j].as_str())).collect();
        for (&i, m) in top.iter().zip(p.match_logits(&emb, &pairs)?) {
            t2i[j][i] = m + s[i][j];
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
