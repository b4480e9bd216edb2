//! `vlalign bench --suite lm`: greedy generation from a frozen decoder LM with the KV cache
//! (BLIP-2 stage 2's decoding path), tokens/s at batch 1 and 8 — the same workload as
//! tools/reference/bench_lm_torch.py (transformers `generate`, same model, same threads): a
//! 16-token prompt, 32 new tokens with no stop, the prompt's prefill included.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::infer::lm_generate::{generate, GenerationConfig};
use crate::models::lm::CausalLm;

/// Prompt length and new tokens of each timed generation.
pub const PROMPT_TOKENS: usize = 16;
pub const NEW_TOKENS: usize = 32;

#[derive(Clone, Debug, Serialize)]
pub struct LmBenchReport {
    pub model: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Median wall time of one generation, and generated tokens per second over the batch.
    pub batch1_ms: f64,
    pub batch1_tokens_per_s: f64,
    pub batch8_ms: f64,
    pub batch8_tokens_per_s: f64,
}

fn median_ms(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

pub fn run(model: &Path, iters: usize, device: &Device) -> Result<LmBenchReport> {
    let (lm, _) = CausalLm::load(model, device)?;
    let cfg = GenerationConfig {
        min_new_tokens: NEW_TOKENS,
        ..GenerationConfig::greedy(NEW_TOKENS, Vec::new())
    };
    let time = |b: usize| -> Result<f64> {
        // Prompt ids 1000..1016 in every row (the twin uses the same).
        let ids: Vec<u32> = (0..b)
            .flat_map(|_| 1000..1000 + PROMPT_TOKENS as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (b, PROMPT_TOKENS), device)?;
        let embeds = lm.embed(&ids)?;
        let mask = vec![vec![1u32; PROMPT_TOKENS]; b];
        let history = vec![Vec::new(); b];
        median_ms(iters, || {
            generate(&lm, &embeds, &mask, &history, &cfg, &mut []).map(|_| ())
        })
    };
    let (b1, b8) = (time(1)?, time(8)?);
    Ok(LmBenchReport {
        model: model.display().to_string(),
        prompt_tokens: PROMPT_TOKENS,
        new_tokens: NEW_TOKENS,
        batch1_ms: b1,
        batch1_tokens_per_s: NEW_TOKENS as f64 / (b1 / 1e3),
        batch8_ms: b8,
        batch8_tokens_per_s: 8.0 * NEW_TOKENS as f64 / (b8 / 1e3),
    })
}
