//! Decoding: greedy and beam search over any model that gives next-token log-probabilities for
//! a set of sequences (the Q-Former's ITG head now; a frozen LM in BLIP-2 stage 2). LAVIS
//! `blip2_qformer.py` `generate` runs beam search over the ITG head; hypotheses here are ranked
//! by mean token log-probability.

use crate::error::Result;

/// A generated sequence (without its start token or end-of-text) and its mean token
/// log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub score: f32,
}

/// Next-token log-probabilities, one row per sequence: `next(seqs)[r][v]` is
/// log p(v | seqs[r]). A banned token has −∞.
pub trait NextTokens: FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>> {}
impl<F: FnMut(&[Vec<u32>]) -> Result<Vec<Vec<f32>>>> NextTokens for F {}

/// Greedy decoding of `n` sequences at once, each from `start`, for at most `max_len` tokens;
/// a sequence stops at `eos` (which is not part of its ids).
pub fn greedy(
    n: usize,
    start: u32,
    eos: Option<u32>,
    max_len: usize,
    mut next: impl NextTokens,
) -> Result<Vec<Generated>> {
    let mut seqs = vec![vec![start]; n];
    let mut done = vec![false; n];
    let mut logp = vec![0f32; n];
    let mut lens = vec![0usize; n];
    for _ in 0..max_len {
        let lp = next(&seqs)?;
        for (r, row) in lp.iter().enumerate() {
            let (best, &v) = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("non-empty vocabulary");
            // Finished rows keep decoding in the batch; they append end-of-text.
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
    Ok(seqs
        .into_iter()
        .enumerate()
        .map(|(r, s)| Generated {
            ids: s[1..=lens[r]]
                .iter()
                .copied()
                .filter(|&t| Some(t) != eos)
                .collect(),
            score: logp[r] / lens[r].max(1) as f32,
        })
        .collect())
}

/// A beam-search hypothesis: tokens after the start, summed log-probability, finished.
type Hypothesis = (Vec<u32>, f32, bool);

fn mean_logp(h: &Hypothesis) -> f32 {
    h.1 / h.0.len().max(1) as f32
}

/// Beam search from `start` keeping `beams` hypotheses for at most `max_len` tokens, ranked by
/// mean token log-probability; finished hypotheses (at `eos`) compete with the live ones.
pub fn beam(
    start: u32,
    eos: Option<u32>,
    beams: usize,
    max_len: usize,
    mut next: impl NextTokens,
) -> Result<Generated> {
    let mut hyps: Vec<Hypothesis> = vec![(Vec::new(), 0.0, false)];
    for _ in 0..max_len {
        let alive: Vec<usize> = (0..hyps.len()).filter(|&i| !hyps[i].2).collect();
        if alive.is_empty() {
            break;
        }
        let seqs: Vec<Vec<u32>> = alive
            .iter()
            .map(|&i| {
                std::iter::once(start)
                    .chain(hyps[i].0.iter().copied())
                    .collect()
            })
            .collect();
        let lp = next(&seqs)?;
        let mut cands: Vec<Hypothesis> = hyps.iter().filter(|h| h.2).cloned().collect();
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
        if cands.is_empty() {
            // Every continuation is banned (−∞): keep the hypotheses as they are.
            break;
        }
        cands.sort_by(|x, y| mean_logp(y).total_cmp(&mean_logp(x)));
        cands.truncate(beams);
        hyps = cands;
    }
    let best = hyps
        .into_iter()
        .max_by(|x, y| mean_logp(x).total_cmp(&mean_logp(y)))
        .expect("at least one hypothesis");
    let score = mean_logp(&best);
    Ok(Generated {
        ids: best.0.into_iter().filter(|&t| Some(t) != eos).collect(),
        score,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy model over tokens {0: start, 1: eos, 2, 3}: after the start, 2 is likelier than 3
    /// (ln 0.6 vs ln 0.4); after 2 only eos follows (ln 0.5, the rest ln 0.25 each); after 3,
    /// eos is certain. Greedy takes 2 then eos: mean (ln 0.6 + ln 0.5) / 2 = −0.602; beam search
    /// finds 3 then eos: (ln 0.4 + 0) / 2 = −0.458, the better mean.
    fn toy(seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let ninf = f32::NEG_INFINITY;
        Ok(seqs
            .iter()
            .map(|s| match s.last() {
                Some(0) => vec![ninf, ninf, 0.6f32.ln(), 0.4f32.ln()],
                Some(2) => vec![ninf, 0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()],
                _ => vec![ninf, 0.0, ninf, ninf],
            })
            .collect())
    }

    #[test]
    fn greedy_and_beam_on_a_hand_built_model() {
        let g = greedy(2, 0, Some(1), 5, toy).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].ids, vec![2]);
        let want = (0.6f32.ln() + 0.5f32.ln()) / 2.0;
        assert!((g[0].score - want).abs() < 1e-6, "{}", g[0].score);
        let b = beam(0, Some(1), 2, 5, toy).unwrap();
        assert_eq!(b.ids, vec![3]);
        assert!((b.score - 0.4f32.ln() / 2.0).abs() < 1e-6, "{}", b.score);
        // Without an end-of-text token, decoding runs to max_len.
        let g = greedy(1, 0, None, 3, toy).unwrap();
        assert_eq!(g[0].ids.len(), 3);
        // A model that bans every token ends the search with what it has, no panic.
        let none = |seqs: &[Vec<u32>]| Ok(vec![vec![f32::NEG_INFINITY; 4]; seqs.len()]);
        assert_eq!(beam(0, Some(1), 2, 5, none).unwrap().ids, Vec::<u32>::new());
    }
}
