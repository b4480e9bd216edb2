//! BLIP-2 stage 2's language-modelling loss (Li et al. 2023, §3.3; LAVIS blip2_opt.py
//! `forward`): next-token cross-entropy of the frozen LM over the caption tokens only — the
//! query positions, the prompt (and the tokenizer's BOS) and the padding are ignored (LAVIS sets
//! their targets to -100).
//!
//! BOS is never a target: LAVIS counts it in the prompt it masks, while transformers'
//! `Blip2ForConditionalGeneration` with `labels = input_ids` would make the last query predict
//! it. BOS is the same token after every image, so learning it teaches the bridge nothing about
//! the image; LAVIS's choice is kept.

use candle_core::{Result, Tensor};

use super::ops::log_softmax;

/// Where one text's targets are: `text` holds its ids (prompt first, then the caption and its
/// end token); token j (≥ `prompt_len`) is predicted from the hidden state one position earlier.
/// Returns `(position of the predicting hidden state within the text, target id)`; position −1
/// (the last query) is reported as `None`.
pub fn caption_targets(text: &[u32], prompt_len: usize) -> Vec<(Option<usize>, u32)> {
    text.iter()
        .enumerate()
        .skip(prompt_len)
        .map(|(j, &t)| (j.checked_sub(1), t))
        .collect()
}

/// Σ −log softmax(logits)[i, targets[i]] over rows `[N, V]`: the summed token cross-entropy (a
/// step divides by its total target count, so micro-batches add up to the batch mean).
pub fn token_cross_entropy_sum(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("{} targets for {n} rows of logits", targets.len());
    }
    let mut idx = Vec::with_capacity(n);
    for (i, &t) in targets.iter().enumerate() {
        if t as usize >= v {
            candle_core::bail!("target {t} of row {i} is outside the vocabulary ({v})");
        }
        idx.push((i * v) as u32 + t);
    }
    let idx = Tensor::from_vec(idx, n, logits.device())?;
    log_softmax(logits)?
        .flatten_all()?
        .index_select(&idx, 0)?
        .sum_all()?
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn targets_skip_the_prompt_and_shift_by_one() {
        // text = [BOS, "a", "photo", cap1, cap2, eos], prompt = [BOS, "a", "photo"].
        let t = caption_targets(&[1, 10, 11, 20, 21, 2], 3);
        assert_eq!(t, [(Some(2), 20), (Some(3), 21), (Some(4), 2)]);
        // No prompt and no BOS: the first caption token is predicted by the last query.
        assert_eq!(caption_targets(&[20, 2], 0), [(None, 20), (Some(0), 2)]);
    }

    /// Hand-derived: logits [0, ln 3] → softmax [1/4, 3/4]; −log(3/4) + −log(1/4) = ln(16/3).
    #[test]
    fn cross_entropy_sums_minus_log_probabilities() {
        let l = Tensor::new(&[[0f32, 3f32.ln()], [0.0, 3f32.ln()]], &Device::Cpu).unwrap();
        let s = token_cross_entropy_sum(&l, &[1, 0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((s - (16f32 / 3.0).ln()).abs() < 1e-6, "{s}");
        assert!(token_cross_entropy_sum(&l, &[2, 0]).is_err());
    }
}
