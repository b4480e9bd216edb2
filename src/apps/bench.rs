//! `vlalign bench`: speed of the reference workloads, for comparison with the PyTorch twin in
//! tools/reference/bench_torch.py (same shapes, same thread count).
//!
//! - clip-tiny train step: forward + backward + AdamW (lr 1e-4, wd 0.1) on a batch of 64; images
//!   64×64, patch 8, width 256, 4 layers, 4 heads, MLP 1024; text vocab 1000, context 32, width
//!   256, 4 layers, causal; projection 256.
//! - ViT-B/32 image embedding: 224², batch 8, forward only.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::Serialize;

use crate::data::batch::Batch;
use crate::data::image::ImageProcessor;
use crate::data::text::{TextTokenizer, TokenBatch};
use crate::error::Result;
use crate::models::clip::{ClipVision, ClipVisionConfig};
use crate::nn::Activation;
use crate::objectives::contrastive::ContrastiveLoss;
use crate::train::config::{ModelSpec, TokenizerSpec};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::task::Task;
use crate::train::tasks::clip::ClipTask;

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub train_step_ms: f64,
    pub train_step_ms_all: Vec<f64>,
    pub vit_b32_batch8_ms: f64,
    pub vit_b32_batch8_ms_all: Vec<f64>,
}

/// The clip-tiny architecture of the benchmark.
fn clip_tiny_bench_spec() -> ModelSpec {
    ModelSpec {
        image_size: 64,
        patch_size: 8,
        vision_width: 256,
        vision_layers: 4,
        vision_heads: 4,
        vision_mlp: 1024,
        text_width: 256,
        text_layers: 4,
        text_heads: 4,
        text_mlp: 1024,
        context_length: 32,
        projection_dim: 256,
        hidden_act: Activation::QuickGelu,
        tokenizer: TokenizerSpec::Shapes,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// A random batch of `b` images and `b` texts of length `ctx` over `vocab` (EOS = vocab − 1 last).
fn random_batch(b: usize, size: usize, ctx: usize, vocab: u32, seed: u64) -> Batch {
    let mut rng = crate::rng::stream(seed, crate::rng::BENCH_INPUTS, 0);
    let pixels = (0..b * 3 * size * size)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let ids = (0..b)
        .map(|_| {
            let mut r: Vec<u32> = (0..ctx).map(|_| rng.random_range(1..vocab - 1)).collect();
            r[ctx - 1] = vocab - 1;
            r
        })
        .collect();
    Batch {
        pixels,
        hw: (size, size),
        tokens: TokenBatch {
            ids,
            mask: vec![vec![1; ctx]; b],
        },
        captions: vec![String::new(); b],
        truths: vec![None; b],
        skipped: Vec::new(),
        position: 0,
    }
}

/// Milliseconds of `iters` clip-tiny train steps (after `warmup` untimed ones).
fn train_step(warmup: usize, iters: usize, device: &Device) -> Result<Vec<f64>> {
    let spec = clip_tiny_bench_spec();
    let vocab = 1000u32;
    let cfg = spec.clip_config(vocab as usize, 0, vocab - 1, 0);
    let tok = TextTokenizer::word_level(&[], spec.context_length)?;
    let mut task = ClipTask::new(
        cfg,
        ContrastiveLoss::InfoNce,
        ImageProcessor::clip_default(64),
        tok,
        Vec::new(),
        0,
        device,
    )?;
    let mut opt = AdamW::new(
        task.vars(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.1,
        },
    )?;
    let batch = random_batch(64, 64, spec.context_length, vocab, 1);
    let mut times = Vec::new();
    for i in 0..warmup + iters {
        let t = Instant::now();
        let (grads, _) = task.grads(std::slice::from_ref(&batch), i as u64)?;
        opt.step(&grads, 1e-4)?;
        task.after_step()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// Milliseconds of ViT-B/32 forward passes on 8 images of 224².
fn vit_b32(warmup: usize, iters: usize, device: &Device) -> Result<Vec<f64>> {
    // transformers' default CLIPVisionConfig is ViT-B/32 (width 768, 12 layers, patch 32, 224²).
    let cfg = ClipVisionConfig::default();
    // Random weights, then detached: the inference path (fused kernels, no autograd graph).
    let varmap = VarMap::new();
    ClipVision::new(VarBuilder::from_varmap(&varmap, DType::F32, device), &cfg)?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let vision = ClipVision::new(VarBuilder::from_tensors(tensors, DType::F32, device), &cfg)?;
    let px = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), device)?;
    let mut times = Vec::new();
    for i in 0..warmup + iters {
        let t = Instant::now();
        let (_, pooled) = vision.forward(&px)?;
        pooled.sum_all()?.to_scalar::<f32>()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

pub fn run(iters: usize, device: &Device) -> Result<BenchReport> {
    let train = train_step(2, iters, device)?;
    let vit = vit_b32(2, iters, device)?;
    Ok(BenchReport {
        threads: candle_core::utils::get_num_threads(),
        train_step_ms: median(&train),
        train_step_ms_all: train,
        vit_b32_batch8_ms: median(&vit),
        vit_b32_batch8_ms_all: vit,
    })
}
