//! Generation from a frozen decoder LM with a KV cache (BLIP-2 stage 2, §3.3): the prefix — soft
//! visual prompts and prompt embeddings — runs once, then each new token costs one position.
//! Greedy, beam search with a length penalty, and temperature / top-p sampling from per-row
//! seeded streams; `max_new_tokens` counts generated tokens only, never the query positions
//! (LAVIS #707), `min_new_tokens` bars the stop tokens until then, a repetition penalty as
//! transformers' `RepetitionPenaltyLogitsProcessor` (CTRL, Keskar et al. 2019), and any set of
//! stop tokens (the LM's eos; LAVIS also stops on "\n").

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::models::lm::{CausalLm, KvCache};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decoding {
    Greedy,
    /// Beam search keeping `beams` hypotheses; a finished one scores its summed log-probability
    /// divided by (generated length)^`length_penalty` (transformers' `BeamHypotheses`).
    Beam {
        beams: usize,
        length_penalty: f32,
    },
    /// Sampling from softmax(logits / temperature) cut to the top-p nucleus (Holtzman et al.).
    Sample {
        temperature: f32,
        top_p: f32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// 1.0 is none; above 1 makes tokens already in the sequence less likely.
    pub repetition_penalty: f32,
    /// Generation ends at any of these (included in the output ids).
    pub stop: Vec<u32>,
    pub decoding: Decoding,
}

impl GenerationConfig {
    pub fn greedy(max_new_tokens: usize, stop: Vec<u32>) -> Self {
        Self {
            max_new_tokens,
            min_new_tokens: 0,
            repetition_penalty: 1.0,
            stop,
            decoding: Decoding::Greedy,
        }
    }

    /// One clear error for a setting that would make generation meaningless or unbounded.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::input(m));
        if self.max_new_tokens == 0 || self.max_new_tokens > 4096 {
            return bad(format!(
                "max_new_tokens ({}) must be between 1 and 4096",
                self.max_new_tokens
            ));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return bad(format!(
                "min_new_tokens ({}) exceeds max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty ({}) must be a positive number",
                self.repetition_penalty
            ));
        }
        match self.decoding {
            Decoding::Beam {
                beams,
                length_penalty,
            } => {
                if beams == 0 || beams > 64 {
                    return bad(format!("beams ({beams}) must be between 1 and 64"));
                }
                if !length_penalty.is_finite() {
                    return bad("length_penalty must be finite".into());
                }
            }
            Decoding::Sample { temperature, top_p } => {
                if !(temperature.is_finite() && temperature > 0.0) {
                    return bad(format!("temperature ({temperature}) must be positive"));
                }
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return bad(format!("top_p ({top_p}) must be in (0, 1]"));
                }
            }
            Decoding::Greedy => {}
        }
        Ok(())
    }
}

/// Generated token ids (after the prefix; the stop token included when one was produced) and
/// the hypothesis score (mean log-probability for greedy and sampling, the length-penalised sum
/// for beam search).
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub score: f32,
}

/// Generates a continuation of each row of `embeds` `[B, T, W]` (0/1 `mask` rows; left
/// padding is how rows of different lengths share a batch). `history[b]` holds the token ids
/// already in row b that the repetition penalty counts (the prompt's; empty for none).
/// Sampling draws row b from `rngs[b]` only.
pub fn generate(
    lm: &CausalLm,
    embeds: &Tensor,
    mask: &[Vec<u32>],
    history: &[Vec<u32>],
    cfg: &GenerationConfig,
    rngs: &mut [ChaCha8Rng],
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    let b = embeds.dim(0)?;
    if mask.len() != b || history.len() != b {
        return Err(Error::input(format!(
            "generate: {b} prefixes, {} mask rows, {} histories",
            mask.len(),
            history.len()
        )));
    }
    match cfg.decoding {
        Decoding::Beam {
            beams,
            length_penalty,
        } => (0..b)
            .map(|r| {
                beam(
                    lm,
                    &embeds.narrow(0, r, 1)?,
                    &mask[r],
                    &history[r],
                    cfg,
                    beams,
                    length_penalty,
                )
            })
            .collect(),
        Decoding::Sample { .. } if rngs.len() != b => Err(Error::input(format!(
            "sampling {b} rows needs {b} random streams, got {}",
            rngs.len()
        ))),
        _ => row_wise(lm, embeds, mask, history, cfg, rngs),
    }
}

/// Log-probabilities `[rows][vocab]` of the last position of `hidden` `[B, T, W]`.
fn last_logits(lm: &CausalLm, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let logits = lm.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)?;
    let rows = logits.to_vec2::<f32>()?;
    crate::nn::ops::ensure_finite_rows(&rows, "language-model logits")?;
    Ok(rows)
}

/// transformers' `RepetitionPenaltyLogitsProcessor` (each distinct earlier token: a negative
/// logit multiplied by the penalty, a positive one divided), then the stop tokens barred while
/// fewer than `min_new_tokens` are out (`MinNewTokensLengthLogitsProcessor`).
fn process(row: &mut [f32], seen: &[u32], produced: usize, cfg: &GenerationConfig) {
    if cfg.repetition_penalty != 1.0 {
        let mut done = std::collections::HashSet::new();
        for &t in seen {
            if let Some(x) = row.get_mut(t as usize).filter(|_| done.insert(t)) {
                *x = if *x < 0.0 {
                    *x * cfg.repetition_penalty
                } else {
                    *x / cfg.repetition_penalty
                };
            }
        }
    }
    if produced < cfg.min_new_tokens {
        for &s in &cfg.stop {
            if let Some(x) = row.get_mut(s as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lz = m + z.ln() as f32;
    row.iter().map(|&x| x - lz).collect()
}

fn argmax(row: &[f32]) -> usize {
    // The first of equal maxima, as torch.argmax.
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Top-p sampling from softmax(row / temperature) (`generate::draw_top_p`).
fn sample(row: &[f32], temperature: f32, top_p: f32, rng: &mut ChaCha8Rng) -> usize {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights = row
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i, (((x - m) / temperature) as f64).exp()))
        .collect();
    super::generate::draw_top_p(weights, top_p, rng).unwrap_or(0)
}

/// Greedy or sampling: every row picks its own token; finished rows stay in the batch (they
/// feed their stop token, masked out) until all are done.
fn row_wise(
    lm: &CausalLm,
    embeds: &Tensor,
    mask: &[Vec<u32>],
    history: &[Vec<u32>],
    cfg: &GenerationConfig,
    rngs: &mut [ChaCha8Rng],
) -> Result<Vec<Generation>> {
    let b = mask.len();
    let device = embeds.device();
    let mut cache = lm.cache();
    let mut rows = last_logits(lm, &lm.forward(embeds, mask, &mut cache)?)?;
    let mut out: Vec<Generation> = vec![
        Generation {
            ids: Vec::new(),
            score: 0.0
        };
        b
    ];
    let mut seen: Vec<Vec<u32>> = history.to_vec();
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                next.push(cfg.stop.first().copied().unwrap_or(0));
                continue;
            }
            process(&mut rows[r], &seen[r], step, cfg);
            let lp = log_softmax(&rows[r]);
            let tok = match cfg.decoding {
                Decoding::Sample { temperature, top_p } => {
                    sample(&rows[r], temperature, top_p, &mut rngs[r])
                }
                _ => argmax(&rows[r]),
            } as u32;
            out[r].ids.push(tok);
            out[r].score += lp[tok as usize];
            seen[r].push(tok);
            done[r] = cfg.stop.contains(&tok);
            next.push(tok);
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let step_mask: Vec<Vec<u32>> = done.iter().map(|&d| vec![u32::from(!d)]).collect();
        rows = last_logits(
            lm,
            &step_forward(lm, &next, &step_mask, &mut cache, device)?,
        )?;
    }
    for g in &mut out {
        g.score /= g.ids.len().max(1) as f32;
    }
    Ok(out)
}

/// One position per row: the embeddings of `tokens`, through the cache.
fn step_forward(
    lm: &CausalLm,
    tokens: &[u32],
    mask: &[Vec<u32>],
    cache: &mut KvCache,
    device: &Device,
) -> Result<Tensor> {
    let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), device)?;
    Ok(lm.forward(&lm.embed(&ids)?, mask, cache)?)
}

/// Beam search for one prefix `[1, T, W]`.
fn beam(
    lm: &CausalLm,
    embeds: &Tensor,
    mask: &[u32],
    history: &[u32],
    cfg: &GenerationConfig,
    k: usize,
    length_penalty: f32,
) -> Result<Generation> {
    let device = embeds.device();
    let mut cache = lm.cache();
    let first = last_logits(lm, &lm.forward(embeds, &[mask.to_vec()], &mut cache)?)?;
    // Live beams: (ids, summed log-probability); the first step starts from one row.
    let mut live: Vec<(Vec<u32>, f32)> = vec![(Vec::new(), 0.0)];
    let mut rows = first;
    let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
    let normalised = |len: usize, sum: f32| sum / (len.max(1) as f32).powf(length_penalty);
    for step in 0..cfg.max_new_tokens {
        let mut cands: Vec<(usize, u32, f32)> = Vec::new();
        for (bi, row) in rows.iter_mut().enumerate() {
            let seen: Vec<u32> = history.iter().chain(&live[bi].0).copied().collect();
            process(row, &seen, step, cfg);
            for (v, lp) in log_softmax(row).into_iter().enumerate() {
                if lp.is_finite() {
                    cands.push((bi, v as u32, live[bi].1 + lp));
                }
            }
        }
        cands.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        let mut next: Vec<(Vec<u32>, f32)> = Vec::with_capacity(k);
        let mut parents = Vec::with_capacity(k);
        for (rank, &(bi, tok, score)) in cands.iter().take(2 * k).enumerate() {
            let mut ids = live[bi].0.clone();
            ids.push(tok);
            if cfg.stop.contains(&tok) {
                // transformers: a stop token among the top `k` candidates ends a hypothesis.
                if rank < k {
                    finished.push((ids.clone(), normalised(ids.len(), score)));
                }
            } else if next.len() < k {
                next.push((ids, score));
                parents.push(bi as u32);
            }
        }
        finished.sort_by(|a, b| b.1.total_cmp(&a.1));
        finished.truncate(k);
        let last = step + 1 == cfg.max_new_tokens;
        // transformers' `is_done` (early_stopping=False): the best live beam, normalised at the
        // current length, cannot beat the worst kept hypothesis.
        let hopeless = finished.len() == k
            && next.first().is_none_or(|(ids, s)| {
                normalised(ids.len(), *s) <= finished.last().map_or(f32::NEG_INFINITY, |f| f.1)
            });
        if next.is_empty() || hopeless || last {
            if finished.len() < k {
                for (ids, s) in next {
                    finished.push((ids.clone(), normalised(ids.len(), s)));
                }
                finished.sort_by(|a, b| b.1.total_cmp(&a.1));
            }
            break;
        }
        cache.select_rows(&parents)?;
        let tokens: Vec<u32> = next
            .iter()
            .map(|(ids, _)| *ids.last().unwrap_or(&0))
            .collect();
        let step_mask = vec![vec![1u32]; next.len()];
        rows = last_logits(
            lm,
            &step_forward(lm, &tokens, &step_mask, &mut cache, device)?,
        )?;
        live = next;
    }
    let (ids, score) = finished
        .into_iter()
        .next()
        .ok_or_else(|| Error::input("beam search produced no hypothesis"))?;
    Ok(Generation { ids, score })
}

/// Softmax probabilities of the last dimension as a plain helper for tests of this module.
#[cfg(test)]
fn probs(row: &[f32]) -> Vec<f32> {
    log_softmax(row).into_iter().map(f32::exp).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut cfg = GenerationConfig::greedy(5, vec![3]);
        cfg.repetition_penalty = 2.0;
        let mut row = vec![4.0, -4.0, 1.0, 0.5];
        process(&mut row, &[0, 1, 0], 0, &cfg);
        assert_eq!(row, [2.0, -8.0, 1.0, 0.5]);
        cfg.min_new_tokens = 2;
        process(&mut row, &[], 1, &cfg);
        assert_eq!(row[3], f32::NEG_INFINITY);
    }

    #[test]
    fn sampling_stays_in_the_nucleus() {
        // Probabilities ≈ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two only.
        let row = [3.0f32, 2.0, 1.0, 0.0];
        let p = probs(&row);
        assert!(p[0] + p[1] >= 0.8 && p[0] < 0.8);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 4];
        for _ in 0..2000 {
            counts[sample(&row, 1.0, 0.8, &mut rng)] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0);
        let share = counts[0] as f32 / 2000.0;
        let expect = p[0] / (p[0] + p[1]);
        assert!((share - expect).abs() < 0.04, "{share} vs {expect}");
    }

    #[test]
    fn bad_settings_are_errors() {
        let mut cfg = GenerationConfig::greedy(0, vec![]);
        assert!(cfg.validate().is_err());
        cfg.max_new_tokens = 4;
        cfg.min_new_tokens = 5;
        assert!(cfg.validate().is_err());
        cfg.min_new_tokens = 0;
        cfg.decoding = Decoding::Sample {
            temperature: 0.0,
            top_p: 0.9,
        };
        assert!(cfg.validate().is_err());
        cfg.decoding = Decoding::Beam {
            beams: 0,
            length_penalty: 1.0,
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
