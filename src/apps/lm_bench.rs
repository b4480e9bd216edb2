//! `vlalign bench --suite lm`: greedy generation from a frozen decoder LM with the KV cache
//! (BLIP-2 stage 2's decoding path), tokens/s at batch 1 and 8 — the same workload as
//! tools/reference/bench_lm_torch.py (transformers `generate`, same model, same threads): a
//! 16-token prompt, 32 new tokens with no stop, the prompt's prefill included.
//!
//! And the LM's share of a stage-2 training step (BLIP-2 §3.3), as the twin: 8 rows of 8 fixed
//! query vectors (width 128) through a trained projection to the LM's width, in front of 24 text
//! tokens; the cross-entropy of the last 16 text tokens, backward through the frozen LM to the
//! projection — as one graph, and split as `train` splits it (two row shards on parallel threads).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use crate::error::Result;
use crate::infer::lm_generate::{generate, GenerationConfig};
use crate::models::lm::CausalLm;
use crate::objectives::lm::token_cross_entropy_sum;

/// Prompt length and new tokens of each timed generation.
pub const PROMPT_TOKENS: usize = 16;
pub const NEW_TOKENS: usize = 32;
/// The training-step workload: rows, query vectors per row and their width, text tokens per row
/// and how many of the last ones are targets.
pub const STEP_ROWS: usize = 8;
pub const STEP_QUERIES: usize = 8;
pub const STEP_QUERY_WIDTH: usize = 128;
pub const STEP_TEXT: usize = 24;
pub const STEP_TARGETS: usize = 16;

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
    /// Median wall time of the training-step workload (forward, loss, backward) as one graph,
    /// and as two row shards on parallel threads.
    pub step_batch8_ms: f64,
    pub step_batch8_sharded_ms: f64,
}

fn median_ms(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(super::bench::median(&t))
}

/// Ids 1000, 1001, … (`n` of them) in each of `rows` rows (the twin uses the same).
fn repeated_ids(rows: usize, n: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = (0..rows).flat_map(|_| 1000..1000 + n as u32).collect();
    Ok(Tensor::from_vec(ids, (rows, n), device)?)
}

pub fn run(model: &Path, iters: usize, device: &Device) -> Result<LmBenchReport> {
    let (lm, lm_cfg) = CausalLm::load(model, device)?;
    let cfg = GenerationConfig {
        min_new_tokens: NEW_TOKENS,
        ..GenerationConfig::greedy(NEW_TOKENS, Vec::new())
    };
    let time = |b: usize| -> Result<f64> {
        let embeds = lm.embed(&repeated_ids(b, PROMPT_TOKENS, device)?)?;
        let mask = vec![vec![1u32; PROMPT_TOKENS]; b];
        let history = vec![Vec::new(); b];
        median_ms(iters, || {
            generate(&lm, &embeds, &mask, &history, &cfg, &mut []).map(|_| ())
        })
    };
    let (b1, b8) = (time(1)?, time(8)?);
    let (step, sharded) = (
        step_ms(&lm, lm_cfg.embed_width(), iters, device, 1)?,
        step_ms(&lm, lm_cfg.embed_width(), iters, device, 2)?,
    );
    Ok(LmBenchReport {
        model: model.display().to_string(),
        prompt_tokens: PROMPT_TOKENS,
        new_tokens: NEW_TOKENS,
        batch1_ms: b1,
        batch1_tokens_per_s: NEW_TOKENS as f64 / (b1 / 1e3),
        batch8_ms: b8,
        batch8_tokens_per_s: 8.0 * NEW_TOKENS as f64 / (b8 / 1e3),
        step_batch8_ms: step,
        step_batch8_sharded_ms: sharded,
    })
}

/// The training-step workload on `rows` rows: the summed loss's gradient for the projection.
fn step_grad(lm: &CausalLm, queries: &Tensor, proj: &Var, rows: usize) -> Result<Tensor> {
    let device = queries.device();
    let prefix = candle_nn::Module::forward(
        &crate::nn::Linear::new(proj.as_tensor().clone(), None),
        queries,
    )?;
    let text = lm.embed(&repeated_ids(rows, STEP_TEXT, device)?)?;
    let embeds = Tensor::cat(&[&prefix, &text], 1)?;
    let len = STEP_QUERIES + STEP_TEXT;
    let hidden = lm.forward(&embeds, &vec![vec![1u32; len]; rows], &mut lm.cache())?;
    // Text token j is predicted at position j - 1; the last STEP_TARGETS tokens are targets.
    let first = len - STEP_TARGETS;
    let mut at = Vec::new();
    let mut targets = Vec::new();
    for r in 0..rows {
        for p in first..len {
            at.push((r * len + p - 1) as u32);
            targets.push(1000 + (p - STEP_QUERIES) as u32);
        }
    }
    let w = hidden.dim(2)?;
    let picked = hidden
        .reshape((rows * len, w))?
        .index_select(&Tensor::from_vec(at, targets.len(), device)?, 0)?;
    let loss = token_cross_entropy_sum(&lm.logits(&picked)?, &targets)?;
    let grads = loss.backward()?;
    grads
        .get(proj.as_tensor())
        .cloned()
        .ok_or_else(|| crate::error::Error::input("the projection got no gradient"))
}

/// Median ms of the training-step workload for [`STEP_ROWS`] rows split into `shards`; `width`
/// is the LM's input-embedding width.
fn step_ms(
    lm: &CausalLm,
    width: usize,
    iters: usize,
    device: &Device,
    shards: usize,
) -> Result<f64> {
    // Fixed values, as the twin's: queries sin(0.37 i), projection 0.02 cos(0.11 i) (row-major).
    let pattern = |n: usize, f: f64, phase: f64, scale: f64| -> Result<Tensor> {
        let i = Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?;
        Ok(i.affine(f, phase)?.sin()?.affine(scale, 0.0)?)
    };
    let queries = pattern(STEP_ROWS * STEP_QUERIES * STEP_QUERY_WIDTH, 0.37, 0.0, 1.0)?
        .reshape((STEP_ROWS, STEP_QUERIES, STEP_QUERY_WIDTH))?;
    let proj = Var::from_tensor(
        &pattern(
            width * STEP_QUERY_WIDTH,
            0.11,
            std::f64::consts::FRAC_PI_2,
            0.02,
        )?
        .reshape((width, STEP_QUERY_WIDTH))?,
    )?;
    let per = STEP_ROWS / shards;
    median_ms(iters, || {
        let shard_rows: Vec<Tensor> = (0..shards)
            .map(|k| queries.narrow(0, k * per, per))
            .collect::<candle_core::Result<_>>()?;
        // As the stage-2 task runs its shards (train/shards.rs); one shard runs here.
        let grads = match shards {
            1 => vec![step_grad(lm, &shard_rows[0], &proj, per)],
            _ => crate::train::shards::run("stage-2 bench", &shard_rows, |q| {
                step_grad(lm, q, &proj, per)
            })?,
        };
        for g in grads {
            g?;
        }
        Ok(())
    })
}
