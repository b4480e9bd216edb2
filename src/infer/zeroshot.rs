//! Zero-shot classification (CLIP §3.1.4): a class is the normalised mean of the normalised
//! embeddings of its prompts ("a photo of a {}." …); an image's logits over the classes are
//! exp(logit_scale) · cosine, and its probabilities their softmax.

use candle_core::Tensor;

use super::clip::ClipPipeline;
use super::Embedder;
use crate::error::{Error, Result};
use crate::nn::ops::l2_normalize;

/// `[C, D]` class embeddings from `templates` (each with `{}` for the class name).
pub fn class_embeddings(
    e: &dyn Embedder,
    classes: &[String],
    templates: &[String],
) -> Result<Tensor> {
    if classes.is_empty() {
        return Err(Error::input(
            "zero-shot classification needs at least one class",
        ));
    }
    if templates.is_empty() || templates.iter().any(|t| !t.contains("{}")) {
        return Err(Error::input(
            "every prompt template needs a {} where the class name goes",
        ));
    }
    let mut rows = Vec::with_capacity(classes.len());
    for c in classes {
        let prompts: Vec<String> = templates.iter().map(|t| t.replace("{}", c)).collect();
        let emb = e.embed_texts(&prompts)?;
        rows.push(l2_normalize(&emb.mean_keepdim(0)?)?);
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// One label's score for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub prob: f32,
    pub logit: f32,
}

/// Each image's labels, most probable first, the best `top` of them (0: all).
pub fn classify(
    p: &ClipPipeline,
    images: &Tensor,
    labels: &[String],
    templates: &[String],
    top: usize,
) -> Result<Vec<Vec<Prediction>>> {
    let classes = class_embeddings(p, labels, templates)?;
    let ranked = rank(images, &classes, p.model.logit_scale_exp()?, top)?;
    Ok(ranked
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|(i, prob, logit)| Prediction {
                    label: labels[i].clone(),
                    prob,
                    logit,
                })
                .collect()
        })
        .collect())
}

/// For each image row, the classes (rows of `classes`) as `(class index, prob, logit)`, most
/// probable first, the best `top` (0: all): logit = `scale` · cosine, probability = softmax.
fn rank(
    images: &Tensor,
    classes: &Tensor,
    scale: f32,
    top: usize,
) -> Result<Vec<Vec<(usize, f32, f32)>>> {
    let n = classes.dim(0)?;
    let logits = (images.matmul(&classes.t()?)? * scale as f64)?;
    crate::nn::ops::ensure_finite(&logits, "zero-shot logits")?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
    let logits = logits.to_vec2::<f32>()?;
    let top = if top == 0 { n } else { top.min(n) };
    Ok(probs
        .iter()
        .zip(&logits)
        .map(|(pr, lg)| {
            super::rank::topk(pr, top)
                .into_iter()
                .map(|i| (i, pr[i], lg[i]))
                .collect()
        })
        .collect())
}

/// Zero-shot ranking of one image embedding over labels from their prompts' embeddings already
/// computed (`prompts`: `per_label` consecutive rows per label), as [`classify`] computes it:
/// class = normalised mean of its prompts, then [`rank`].
/// Returns `(label index, prob, logit)`, most probable first.
pub fn rank_rows(
    image: &[f32],
    prompts: &[Vec<f32>],
    per_label: usize,
    scale: f32,
) -> Result<Vec<(usize, f32, f32)>> {
    let dim = image.len();
    if per_label == 0 || prompts.is_empty() || !prompts.len().is_multiple_of(per_label) {
        return Err(Error::input(
            "zero-shot needs the same prompts for every label",
        ));
    }
    let dev = candle_core::Device::Cpu;
    let flat: Vec<f32> = prompts.iter().flatten().copied().collect();
    let labels = prompts.len() / per_label;
    let t = Tensor::from_vec(flat, (labels, per_label, dim), &dev)?;
    let classes = l2_normalize(&t.mean(1)?)?;
    let img = Tensor::from_vec(image.to_vec(), (1, dim), &dev)?;
    Ok(rank(&img, &classes, scale, 0)?.remove(0))
}
