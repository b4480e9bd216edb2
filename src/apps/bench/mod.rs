//! `vlalign bench`: speed and memory of the workloads we ship, one row each, for the table that
//! tools/bench.sh prints beside the PyTorch twins (tools/reference/bench_torch.py and
//! bench_qformer_torch.py: same shapes, same thread count, same warm-up and median).
//!
//! Rows (every one after `warmup` untimed iterations, the median of `iters`):
//! - `clip_tiny_train`: forward + backward + AdamW (lr 1e-4, wd 0.1) on a batch of 64; images
//!   64×64, patch 8, width 256, 4 layers, 4 heads, MLP 1024; text vocab 1000, context 32, width
//!   256, 4 layers, causal; projection 256; InfoNCE.
//! - `siglip_train`: the same towers and batch with the sigmoid loss (SigLIP).
//! - `clip_rn_train`: configs/clip-tiny-rn.toml's CLIP (ModifiedResNet image tower, layers
//!   [1, 1, 1, 1], width 16, 8 pooling heads; text width 64, 2 layers) with vocab 1000, InfoNCE,
//!   AdamW as `clip_tiny_train`, batch 64.
//! - `qformer_train`: one BLIP-2 stage-1 step (ITC + ITM + ITG, AdamW) of configs/qformer-tiny.toml
//!   on a batch of 32 over the frozen tower of a random clip-tiny (configs/clip-tiny.toml).
//! - `vit_b32_embed`: ViT-B/32 image embedding, 224², batch 8, forward only.
//! - `loader_shapes`, `loader_jpeg`: the data loader (one worker) producing batches of 64:
//!   shapes rendered at 64², or a JPEG (`--image`) decoded and preprocessed to 224² — beside what the train
//!   step or the embedding consumes per second.
//!
//! Each row carries the matrix-product work of one iteration (flops.rs) and so the achieved
//! GFLOP/s, which the report also gives as a fraction of the machine's measured float32 matmul
//! peak; and the peak resident memory while the row ran (memory.rs) with the growth from the
//! end of the warm-up to the last iteration (a leak shows there).

mod flops;
pub mod memory;
mod vit_b32;

pub use vit_b32::{run_vit_b32, VitB32Report};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use serde::Serialize;

use crate::apps::demo::clip::CLIP_TINY_TOML;
use crate::apps::demo::qformer::QFORMER_TINY_TOML;
use crate::data::batch::Batch;
use crate::data::image::ImageProcessor;
use crate::data::loader::{Augment, Loader, LoaderConfig, Source};
use crate::data::text::{TextTokenizer, TokenBatch};
use crate::error::{Error, Result};
use crate::models::clip::{ClipVision, ClipVisionConfig};
use crate::nn::Activation;
use crate::objectives::contrastive::ContrastiveLoss;
use crate::train::config::{ModelSpec, Precision, TokenizerSpec, TrainConfig};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::task::Task;
use crate::train::tasks::clip::ClipTask;
use crate::train::tasks::qformer::QformerTask;

/// Warm-up and timed iterations of every row.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub warmup: usize,
    pub iters: usize,
}

/// One workload's figures.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Row {
    /// The row's key (`clip_tiny_train`, ...).
    pub name: String,
    pub what: String,
    /// Median milliseconds of one iteration, and every timed iteration.
    pub ms: f64,
    pub ms_all: Vec<f64>,
    /// Samples (pairs, images) one iteration handles, and so per second at the median.
    pub samples: usize,
    pub samples_per_s: f64,
    /// Matrix-product work of one iteration (GFLOP) and the rate achieved at the median.
    pub gflop: Option<f64>,
    pub gflops: Option<f64>,
    /// Peak resident memory of the process that ran the row (its setup included), MiB; the resident
    /// growth from the end of the warm-up to the end (MiB; near 0 when nothing leaks).
    pub peak_rss_mb: Option<f64>,
    pub rss_growth_mb: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub warmup: usize,
    pub iters: usize,
    /// The float32 matmul rate of this machine on these threads (the best of 1024² and 2048²
    /// square products), GFLOP/s: the peak the rows' rates are fractions of.
    pub matmul_peak_gflops: f64,
    pub rows: Vec<Row>,
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

/// configs/clip-tiny-rn.toml's architecture (a ModifiedResNet image tower), text vocabulary as
/// [`clip_tiny_bench_spec`]'s.
fn clip_tiny_rn_bench_spec() -> ModelSpec {
    ModelSpec {
        image_size: 64,
        patch_size: 8,
        vision_width: 16,
        vision_layers: 0,
        vision_heads: 8,
        vision_mlp: 0,
        resnet_layers: Some([1, 1, 1, 1]),
        text_width: 64,
        text_layers: 2,
        text_heads: 2,
        text_mlp: 256,
        context_length: 32,
        projection_dim: 128,
        hidden_act: Activation::QuickGelu,
        tokenizer: TokenizerSpec::Shapes,
    }
}

/// The shapes [`flops`] counts for a CLIP spec.
fn clip_shape(s: &ModelSpec) -> flops::ClipShape {
    flops::ClipShape {
        image_size: s.image_size,
        patch_size: s.patch_size,
        vision_width: s.vision_width,
        vision_layers: s.vision_layers,
        vision_mlp: s.vision_mlp,
        text_width: s.text_width,
        text_layers: s.text_layers,
        text_mlp: s.text_mlp,
        context_length: s.context_length,
        projection_dim: s.projection_dim,
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

/// How a benchmarked CLIP step trains (`train.precision`, `train.grad_checkpointing`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StepMode {
    pub precision: Precision,
    pub grad_checkpointing: bool,
}

/// A CLIP training step ready to run: the task, its optimiser and a fixed random batch.
struct ClipStep {
    task: ClipTask,
    opt: AdamW,
    batch: Batch,
}

impl ClipStep {
    fn new(
        spec: &ModelSpec,
        vocab: u32,
        loss: ContrastiveLoss,
        batch: usize,
        mode: StepMode,
        device: &Device,
    ) -> Result<Self> {
        let cfg = spec.clip_config(vocab as usize, 0, vocab - 1, 0);
        let tok = TextTokenizer::word_level(&[], spec.context_length)?;
        let task = ClipTask::new(
            cfg,
            loss,
            ImageProcessor::clip_default(spec.image_size),
            tok,
            Vec::new(),
            0,
            device,
        )?
        .with_precision(mode.precision)?
        .with_checkpointing(mode.grad_checkpointing)?;
        let opt = AdamW::new(
            task.vars(),
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6,
                weight_decay: 0.1,
            },
        )?;
        let batch = random_batch(batch, spec.image_size, spec.context_length, vocab, 1);
        Ok(Self { task, opt, batch })
    }

    /// Forward and backward (`Task::grads`), then AdamW; returns the two parts' milliseconds.
    fn step(&mut self, i: u64, device: &Device) -> Result<(f64, f64)> {
        let t = Instant::now();
        let (grads, _) = self.task.grads(std::slice::from_ref(&self.batch), i)?;
        device.synchronize()?;
        let grads_ms = ms_since(t);
        let t = Instant::now();
        self.opt.step(&grads, 1e-4)?;
        self.task.after_step()?;
        device.synchronize()?;
        Ok((grads_ms, ms_since(t)))
    }

    /// The forward pass with its autograd graph, and the loss.
    fn forward(&self) -> Result<()> {
        let task = &self.task;
        let (img, txt) = task.features(&self.batch, true)?;
        let scale = task.model.logit_scale.clone().expect("a full CLIP");
        let loss = task
            .loss
            .loss(&img, &txt, &scale, task.model.logit_bias.as_ref())?;
        loss.to_scalar::<f32>()?;
        Ok(())
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
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

/// `iters` train steps of `spec` on a random batch of `batch` (after `warmup` untimed ones),
/// each phase timed apart (a forward-only pass first when `phases`).
#[allow(clippy::too_many_arguments)]
fn train_phases(
    spec: &ModelSpec,
    vocab: u32,
    loss: ContrastiveLoss,
    batch: usize,
    warmup: usize,
    iters: usize,
    phases: bool,
    mode: StepMode,
    device: &Device,
) -> Result<Phases> {
    let mut s = ClipStep::new(spec, vocab, loss, batch, mode, device)?;
    let mut out = Phases::default();
    for i in 0..warmup + iters {
        let keep = i >= warmup;
        if phases {
            let t = Instant::now();
            s.forward()?;
            device.synchronize()?;
            if keep {
                out.forward.push(ms_since(t));
            }
        }
        let (g, o) = s.step(i as u64, device)?;
        if keep {
            out.grads.push(g);
            out.optimizer.push(o);
            out.step.push(g + o);
        }
    }
    Ok(out)
}

/// A detached ViT-B/32 vision tower with random weights (transformers' default
/// `CLIPVisionConfig`: width 768, 12 layers, patch 32, 224²): the inference path (fused
/// kernels, no autograd graph, frozen weights laid out as a loaded model's).
fn vit_b32_tower(device: &Device) -> Result<ClipVision> {
    let cfg = ClipVisionConfig::default();
    let tensors: HashMap<String, Tensor> = {
        let varmap = VarMap::new();
        ClipVision::new(VarBuilder::from_varmap(&varmap, DType::F32, device), &cfg)?;
        let data = varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    };
    Ok(ClipVision::new(
        crate::nn::init::taking(tensors, DType::F32, device),
        &cfg,
    )?)
}

/// Milliseconds of ViT-B/32 image-tower forward passes on `batch` images of 224², its encoder
/// layers' products in `precision` (`Bf16`: the float32 weights cast per pass).
fn vit_b32_embed(
    batch: usize,
    warmup: usize,
    iters: usize,
    precision: Precision,
    device: &Device,
) -> Result<Vec<f64>> {
    let mut vision = vit_b32_tower(device)?;
    vision.encoder_mut().set_compute(precision.compute_dtype());
    let px = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), device)?;
    let mut times = Vec::new();
    for i in 0..warmup + iters {
        let t = Instant::now();
        let (_, pooled) = vision.forward(&px)?;
        pooled.sum_all()?.to_scalar::<f32>()?;
        if i >= warmup {
            times.push(ms_since(t));
        }
    }
    Ok(times)
}

/// Times one row: `setup` (in the peak memory, not in the time) gives the iteration;
/// `settings.warmup` untimed runs, then the median of `settings.iters`.
fn measure<F: FnMut(u64) -> Result<()>>(
    name: &str,
    what: &str,
    samples: usize,
    gflop: Option<f64>,
    settings: Settings,
    device: &Device,
    setup: impl FnOnce() -> Result<F>,
) -> Result<Row> {
    let mut iteration = setup()?;
    let mut ms_all = Vec::with_capacity(settings.iters);
    let mut warm_rss = None;
    for i in 0..settings.warmup + settings.iters {
        if i == settings.warmup {
            warm_rss = memory::rss_mb();
        }
        let t = Instant::now();
        iteration(i as u64)?;
        device.synchronize()?;
        if i >= settings.warmup {
            ms_all.push(ms_since(t));
        }
    }
    let (peak_rss_mb, end_rss) = (memory::peak_rss_mb(), memory::rss_mb());
    let ms = median(&ms_all);
    let rss_growth_mb = match (warm_rss, end_rss) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(Row {
        name: name.to_string(),
        what: what.to_string(),
        ms,
        ms_all,
        samples,
        samples_per_s: samples as f64 / (ms / 1e3),
        gflop: gflop.map(|f| f / 1e9),
        gflops: gflop.map(|f| f / 1e9 / (ms / 1e3)),
        peak_rss_mb,
        rss_growth_mb,
    })
}

/// The float32 matmul rate (GFLOP/s): the better of square products of 1024 and 2048.
pub fn matmul_peak(iters: usize, device: &Device) -> Result<f64> {
    let mut best = 0f64;
    for n in [1024usize, 2048] {
        let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
        let mut times = Vec::new();
        for i in 0..iters + 2 {
            let t = Instant::now();
            let c = a.matmul(&b)?;
            device.synchronize()?;
            drop(c);
            if i >= 2 {
                times.push(ms_since(t));
            }
        }
        let flop = 2.0 * (n as f64).powi(3);
        best = best.max(flop / 1e9 / (median(&times) / 1e3));
    }
    Ok(best)
}

/// A fresh clip-tiny CLIP (configs/clip-tiny.toml, seed 0) written as a model directory under
/// `dir`: the frozen tower of the Q-Former row. Returns the directory and the preset's spec.
fn write_clip_tiny(dir: &Path, device: &Device) -> Result<(PathBuf, ModelSpec)> {
    let cfg = TrainConfig::from_toml(CLIP_TINY_TOML).map_err(Error::input)?;
    let spec = cfg.model.expect("clip-tiny has a [model]");
    let task = ClipTask::from_spec(&spec, ContrastiveLoss::InfoNce, 0, device)?;
    let out = dir.join("clip-tiny");
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    task.write_model(&out)?;
    Ok((out, spec))
}

/// The Q-Former row's task (configs/qformer-tiny.toml over the CLIP directory `vision` of spec
/// `vspec`), its optimiser as the preset configures it, and a random batch of 32 full-length
/// captions.
fn qformer_step(
    (vision, vspec): &(PathBuf, ModelSpec),
    device: &Device,
) -> Result<(QformerTask, AdamW, Batch, f64)> {
    let mut cfg = TrainConfig::from_toml(QFORMER_TINY_TOML).map_err(Error::input)?;
    let spec = cfg.qformer.as_mut().expect("qformer-tiny has a [qformer]");
    spec.vision_model = vision.display().to_string();
    let spec = spec.clone();
    let task = QformerTask::new(&cfg, device)?;
    let t = &cfg.train;
    let opt = AdamW::new(task.vars(), AdamWConfig::of(t))?;
    let vocab = task.parts.tokenizer.vocab_size() as u32;
    let batch = random_batch(32, vspec.image_size, spec.max_text_len, vocab, 1);
    let shape = flops::QformerShape {
        vision: clip_shape(vspec),
        vision_drop_layers: spec.vision_drop_layers,
        hidden: spec.hidden_size,
        layers: spec.num_hidden_layers,
        intermediate: spec.intermediate_size,
        queries: spec.num_query_tokens,
        embed_dim: spec.embed_dim,
        text_len: spec.max_text_len,
        vocab: vocab as usize + 1,
    };
    Ok((task, opt, batch, flops::qformer_train_step(&shape, 32)))
}

/// A loader of batches of 64 from `source` (one worker) with `processor`.
fn loader(source: Source, processor: ImageProcessor, context: usize) -> Result<Loader> {
    let cfg = LoaderConfig {
        batch_size: 64,
        workers: 1,
        prefetch: 2,
        seed: 0,
        augment: Augment::None,
        shuffle_buffer: 1000,
        shard: (0, 1),
    };
    let tok = crate::train::tokenizer::tokenizer_for(&TokenizerSpec::Shapes, context)?.0;
    Loader::start(source, &cfg, processor, Arc::new(tok), 0)
}

/// A manifest of 64 lines, every one `image`, under `dir`.
fn jpeg_manifest(dir: &Path, image: &Path) -> Result<PathBuf> {
    let image = std::fs::canonicalize(image).map_err(|e| Error::io(image, e))?;
    let line = serde_json::json!({"image": image, "caption": "a photo"}).to_string();
    let path = dir.join("manifest.jsonl");
    std::fs::write(&path, format!("{line}\n").repeat(64)).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// The rows of the default suite, in order.
pub const ROWS: [&str; 7] = [
    "clip_tiny_train",
    "siglip_train",
    "clip_rn_train",
    "qformer_train",
    "vit_b32_embed",
    "loader_shapes",
    "loader_jpeg",
];

/// Runs the row `name` ([`ROWS`]) in this process. `image` is the JPEG of `loader_jpeg`. Its
/// peak memory is this process's: the CLI runs each row in a process of its own.
pub fn run_row(name: &str, settings: Settings, image: &Path, device: &Device) -> Result<Row> {
    let s = settings;
    let tiny = clip_tiny_bench_spec();
    // A CLIP train step of `spec` at batch 64, vocabulary 1000, doing `gflop` of products.
    let clip = |what: &str, spec: &ModelSpec, gflop: f64, loss: ContrastiveLoss| {
        measure(name, what, 64, Some(gflop), s, device, || {
            let mut step = ClipStep::new(spec, 1000, loss, 64, StepMode::default(), device)?;
            Ok(move |i| step.step(i, device).map(|_| ()))
        })
    };
    let tiny_gflop = flops::clip_train_step(&clip_shape(&tiny), 64);
    let loader_row = |what: &str, source: Source, size: usize, context: usize| {
        measure(name, what, 64, None, s, device, || {
            let mut l = loader(source, ImageProcessor::clip_default(size), context)?;
            Ok(move |_| l.next_batch().map(|_| ()))
        })
    };
    match name {
        "clip_tiny_train" => clip(
            "clip-tiny train step, InfoNCE, batch 64",
            &tiny,
            tiny_gflop,
            ContrastiveLoss::InfoNce,
        ),
        "siglip_train" => clip(
            "clip-tiny train step, SigLIP, batch 64",
            &tiny,
            tiny_gflop,
            ContrastiveLoss::SigLip,
        ),
        "clip_rn_train" => {
            let rn = clip_tiny_rn_bench_spec();
            let layers = rn.resnet_layers.unwrap_or_default();
            let gflop =
                flops::resnet_clip_train_step(&clip_shape(&rn), layers, rn.vision_width, 64);
            clip(
                "clip-tiny-rn train step (ModifiedResNet [1,1,1,1] width 16), InfoNCE, batch 64",
                &rn,
                gflop,
                ContrastiveLoss::InfoNce,
            )
        }
        "qformer_train" => with_scratch(|scratch| {
            let vision = write_clip_tiny(scratch, device)?;
            let (task, opt, batch, gflop) = qformer_step(&vision, device)?;
            measure(
                name,
                "Q-Former stage-1 step (ITC+ITM+ITG), qformer-tiny, batch 32",
                32,
                Some(gflop),
                s,
                device,
                || {
                    let (mut task, mut opt) = (task, opt);
                    Ok(move |i| {
                        let (grads, _) = task.grads(std::slice::from_ref(&batch), i)?;
                        opt.step(&grads, 1e-3)?;
                        task.after_step()
                    })
                },
            )
        }),
        "vit_b32_embed" => measure(
            name,
            "ViT-B/32 image embedding, 224², batch 8",
            8,
            Some(flops::image_embed(&clip_shape(&vit_b32_spec()), 8)),
            s,
            device,
            || {
                let vision = vit_b32_tower(device)?;
                let px = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), device)?;
                Ok(move |_| {
                    let (_, pooled) = vision.forward(&px)?;
                    pooled.sum_all()?.to_scalar::<f32>()?;
                    Ok(())
                })
            },
        ),
        "loader_shapes" => {
            let shapes = crate::data::shapes::ShapesConfig {
                image_size: 64,
                ..Default::default()
            };
            loader_row(
                "loader: shapes rendered at 64², batches of 64, 1 worker",
                Source::Shapes(shapes),
                64,
                32,
            )
        }
        "loader_jpeg" => with_scratch(|scratch| {
            let manifest = jpeg_manifest(scratch, image)?;
            let entries = crate::data::manifest::read(&manifest)?;
            loader_row(
                "loader: a JPEG decoded and preprocessed to 224², batches of 64, 1 worker",
                Source::Manifest(Arc::new(entries)),
                224,
                77,
            )
        }),
        other => Err(Error::input(format!(
            "no benchmark row {other:?} (rows: {})",
            ROWS.join(", ")
        ))),
    }
}

/// Runs `f` on a fresh scratch directory, removed afterwards.
fn with_scratch<T>(f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let dir = std::env::temp_dir().join(format!("vlalign-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let out = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    out
}
