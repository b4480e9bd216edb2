//! `vlalign bench`: speed of the reference workloads, for comparison with the PyTorch twin in
//! tools/reference/bench_torch.py (same shapes, same thread count).
//!
//! - clip-tiny train step: forward + backward + AdamW (lr 1e-4, wd 0.1) on a batch of 64; images
//!   64×64, patch 8, width 256, 4 layers, 4 heads, MLP 1024; text vocab 1000, context 32, width
//!   256, 4 layers, causal; projection 256.
//! - ViT-B/32 image embedding: 224², batch 8, forward only.
//!
//! The `vit-b32` suite (for GPUs; tools/device-check.sh runs it beside PyTorch) times the real
//! ViT-B/32 CLIP (configs/clip-vit-b32.toml: 224², patch 32, text context 77, vocabulary 49408)
//! training with AdamW and embedding images, at a batch size of the caller's choice.

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

/// OpenAI's ViT-B/32 CLIP, as configs/clip-vit-b32.toml.
fn vit_b32_spec() -> ModelSpec {
    ModelSpec {
        image_size: 224,
        patch_size: 32,
        vision_width: 768,
        vision_layers: 12,
        vision_heads: 12,
        vision_mlp: 3072,
        resnet_layers: None,
        text_width: 512,
        text_layers: 12,
        text_heads: 8,
        text_mlp: 2048,
        context_length: 77,
        projection_dim: 512,
        hidden_act: Activation::QuickGelu,
        tokenizer: TokenizerSpec::Clip,
    }
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
        resnet_layers: None,
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

/// The middle value of `v` (the upper one of an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
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
        image_ids: (0..b as u64).collect(),
        skipped: Vec::new(),
        position: 0,
    }
}

/// Milliseconds per iteration of a train step's phases, each ended by a device synchronisation.
#[derive(Default)]
struct Phases {
    /// The forward pass with its autograd graph, and the loss.
    forward: Vec<f64>,
    /// Forward and backward (`Task::grads`).
    grads: Vec<f64>,
    /// AdamW and the post-step clamp.
    optimizer: Vec<f64>,
    /// The whole step (grads + optimizer).
    step: Vec<f64>,
}

/// Milliseconds of `iters` train steps of `spec` on a random batch of `batch` (after `warmup`
/// untimed ones), each ended by a device synchronisation.
fn train_step(
    spec: &ModelSpec,
    vocab: u32,
    batch: usize,
    warmup: usize,
    iters: usize,
    device: &Device,
) -> Result<Vec<f64>> {
    Ok(train_phases(spec, vocab, batch, warmup, iters, false, device)?.step)
}

/// [`train_step`], with each phase timed apart when `phases` (a forward-only pass first).
fn train_phases(
    spec: &ModelSpec,
    vocab: u32,
    batch: usize,
    warmup: usize,
    iters: usize,
    phases: bool,
    device: &Device,
) -> Result<Phases> {
    let cfg = spec.clip_config(vocab as usize, 0, vocab - 1, 0);
    let tok = TextTokenizer::word_level(&[], spec.context_length)?;
    let mut task = ClipTask::new(
        cfg,
        ContrastiveLoss::InfoNce,
        ImageProcessor::clip_default(spec.image_size),
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
    let batch = random_batch(batch, spec.image_size, spec.context_length, vocab, 1);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let mut out = Phases::default();
    for i in 0..warmup + iters {
        let keep = i >= warmup;
        if phases {
            let t = Instant::now();
            let (img, txt) = task.features(&batch, true)?;
            let scale = task.model.logit_scale.clone().expect("a full CLIP");
            let loss = task
                .loss
                .loss(&img, &txt, &scale, task.model.logit_bias.as_ref())?;
            loss.to_scalar::<f32>()?;
            device.synchronize()?;
            if keep {
                out.forward.push(ms(t));
            }
        }
        let t = Instant::now();
        let (grads, _) = task.grads(std::slice::from_ref(&batch), i as u64)?;
        device.synchronize()?;
        let grads_ms = ms(t);
        let t_opt = Instant::now();
        opt.step(&grads, 1e-4)?;
        task.after_step()?;
        device.synchronize()?;
        if keep {
            out.grads.push(grads_ms);
            out.optimizer.push(ms(t_opt));
            out.step.push(ms(t));
        }
    }
    Ok(out)
}

/// Milliseconds of ViT-B/32 image-tower forward passes on `batch` images of 224².
fn vit_b32(batch: usize, warmup: usize, iters: usize, device: &Device) -> Result<Vec<f64>> {
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
    let px = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), device)?;
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
    let train = train_step(&clip_tiny_bench_spec(), 1000, 64, 2, iters, device)?;
    let vit = vit_b32(8, 2, iters, device)?;
    Ok(BenchReport {
        threads: candle_core::utils::get_num_threads(),
        train_step_ms: median(&train),
        train_step_ms_all: train,
        vit_b32_batch8_ms: median(&vit),
        vit_b32_batch8_ms_all: vit,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct VitB32Report {
    pub device: String,
    pub batch: usize,
    /// ViT-B/32 CLIP training (forward, backward, AdamW), float32: median step and samples/s.
    pub train_step_ms: f64,
    pub train_samples_per_s: f64,
    /// Medians of the step's phases: forward (with graph) + loss, forward + backward, AdamW.
    pub train_forward_ms: f64,
    pub train_grads_ms: f64,
    pub train_optimizer_ms: f64,
    /// ViT-B/32 image embedding: median forward and images/s.
    pub embed_ms: f64,
    pub embed_images_per_s: f64,
    /// One ViT-B/32 layer's pieces at this batch (vision: 50 tokens × 768), forward + backward,
    /// median ms each: where a step's time goes.
    pub ops_ms: Vec<(String, f64)>,
}

/// Median ms of `f` (after 2 untimed runs), each run ended by a device synchronisation.
fn time_ms(iters: usize, device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&times))
}

/// The building blocks of one ViT-B/32 vision layer at `batch`, each forward + backward through
/// the training path (trainable weights, so the differentiable compositions run off-CPU).
fn layer_ops(batch: usize, iters: usize, device: &Device) -> Result<Vec<(String, f64)>> {
    use crate::nn::{linear, Activation, LayerNorm};
    use candle_nn::Module;
    let (t, h, heads) = (50, 768, 12);
    let varmap = VarMap::new();
    let vb = crate::nn::init::seeded_var_builder(&varmap, 0, DType::F32, device);
    let fc1 = linear(h, 4 * h, vb.pp("fc1"))?;
    let norm = LayerNorm::new(vb.pp("ln"), h, 1e-5)?;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, t, h), device)?)?;
    let wide =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, t, 4 * h), device)?)?;
    let scores =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, heads, t, t), device)?)?;
    let backward = |y: Tensor| -> Result<()> {
        y.sum_all()?.backward()?;
        Ok(())
    };
    let mut out = Vec::new();
    out.push((
        "linear 768->3072 (fc1)".to_string(),
        time_ms(iters, device, || backward(fc1.forward(x.as_tensor())?))?,
    ));
    out.push((
        "layer_norm 768".to_string(),
        time_ms(iters, device, || backward(norm.forward(x.as_tensor())?))?,
    ));
    out.push((
        "quick_gelu 3072".to_string(),
        time_ms(iters, device, || {
            backward(Activation::QuickGelu.forward(wide.as_tensor())?)
        })?,
    ));
    out.push((
        "softmax 12x50x50".to_string(),
        time_ms(iters, device, || {
            backward(crate::nn::ops::softmax_last(scores.as_tensor())?)
        })?,
    ));
    out.push((
        "attention 12 heads".to_string(),
        time_ms(iters, device, || {
            let v = x.as_tensor();
            backward(crate::nn::attention::multi_head(v, v, v, heads, None)?)
        })?,
    ));
    Ok(out)
}

/// The `vit-b32` suite at `batch`: `iters` timed iterations of each after 2 untimed.
pub fn run_vit_b32(iters: usize, batch: usize, device: &Device) -> Result<VitB32Report> {
    let p = train_phases(&vit_b32_spec(), 49408, batch, 2, iters, true, device)?;
    let train = median(&p.step);
    let embed = median(&vit_b32(batch, 2, iters, device)?);
    Ok(VitB32Report {
        device: format!("{device:?}"),
        batch,
        train_step_ms: train,
        train_samples_per_s: batch as f64 / (train / 1e3),
        train_forward_ms: median(&p.forward),
        train_grads_ms: median(&p.grads),
        train_optimizer_ms: median(&p.optimizer),
        embed_ms: embed,
        embed_images_per_s: batch as f64 / (embed / 1e3),
        ops_ms: layer_ops(batch, iters, device)?,
    })
}
