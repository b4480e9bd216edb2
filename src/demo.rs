//! `vlalign demo`: the main job on built-in data (DESIGN.md §5). Generates shapes, trains the
//! tiny CLIP of configs/clip-tiny.toml, evaluates zero-shot accuracy on held-out images of seen
//! and of never-seen colour–shape compositions and retrieval on 1,000 held-out pairs, and leaves
//! a model directory that `embed`, `zeroshot` and `eval` accept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use crate::config::TrainConfig;
use crate::data::image::RgbImage;
use crate::data::manifest::{self, Entry};
use crate::data::shapes::{self, PairSet, ShapesConfig, ShapesSample};
use crate::error::{Error, Result};
use crate::eval::report::{evaluate, EvalReport, EvalSet};
use crate::train::clip_task::ClipTask;
use crate::train::setup;
use crate::train::trainer::{self, EvalHook, RunOptions};

/// The demo's configuration, compiled in so the binary runs from anywhere.
pub const CLIP_TINY_TOML: &str = include_str!("../configs/clip-tiny.toml");

/// Seed offset of the evaluation images (never the training stream's).
pub(crate) const EVAL_SEED: u64 = 1_000_003;
/// Single-object evaluation images per class.
const PER_CLASS: usize = 12;
/// Held-out image–caption pairs for retrieval.
pub(crate) const RETRIEVAL_PAIRS: usize = 1000;

pub struct DemoOptions {
    pub out: PathBuf,
    /// A training config to use instead of configs/clip-tiny.toml (a shapes CLIP).
    pub config: Option<PathBuf>,
    pub resume: bool,
    pub steps: Option<u64>,
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub model_dir: PathBuf,
    pub wall_seconds: f64,
    pub train_seconds: f64,
    pub steps: u64,
    pub samples_per_second: f64,
    /// Seen-composition images, classified among the 42 seen classes.
    pub zeroshot_top1_seen: f64,
    pub zeroshot_top5_seen: f64,
    /// Never-seen compositions, classified among all 48 classes (chance 1/48).
    pub zeroshot_top1_unseen: f64,
    /// Never-seen compositions, classified among the 6 unseen classes only (chance 1/6).
    pub zeroshot_top1_unseen_closed: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    pub t2i_r10: f64,
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub i2t_r10: f64,
    pub n_retrieval: usize,
    pub eval_dir: PathBuf,
}

pub(crate) fn class_set(
    size: usize,
    pairs: PairSet,
    per_class: usize,
    seed: u64,
) -> Vec<ShapesSample> {
    let mut out = Vec::new();
    for (k, class) in shapes::classes(pairs).iter().enumerate() {
        let (c, s) = shapes::class_indices(class).expect("class names parse");
        for i in 0..per_class {
            out.push(shapes::generate_class(
                size,
                seed,
                (k * per_class + i) as u64,
                c,
                s,
            ));
        }
    }
    out
}

fn to_set(samples: &[ShapesSample]) -> EvalSet {
    EvalSet {
        images: samples.iter().map(|s| s.image.clone()).collect(),
        captions: samples.iter().map(|s| s.caption.clone()).collect(),
        classes: samples
            .iter()
            .map(|s| (s.objects.len() == 1).then(|| s.objects[0].class_name()))
            .collect(),
        skipped: Vec::new(),
    }
}

/// Writes samples as PNGs plus a manifest, so `vlalign eval` can reproduce the figures.
pub fn write_shapes_dir(dir: &Path, samples: &[ShapesSample]) -> Result<PathBuf> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let mut entries = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        let p = images.join(format!("{:06}.png", i + 1));
        save_png(&p, &s.image)?;
        entries.push(Entry {
            image: p,
            caption: s.caption.clone(),
            objects: Some(s.objects.clone()),
        });
    }
    let m = dir.join("manifest.jsonl");
    manifest::write_jsonl(&m, dir, &entries)?;
    Ok(m)
}

pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    image::save_buffer(
        path,
        &img.data,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let t0 = Instant::now();
    let mut cfg = match &opts.config {
        Some(p) => TrainConfig::from_file(p)?,
        None => TrainConfig::from_toml(CLIP_TINY_TOML)
            .map_err(|m| Error::config("configs/clip-tiny.toml", m))?,
    };
    if cfg.data.source != "shapes" {
        return Err(Error::input(
            "the demo trains on the built-in shapes data: data.source must be \"shapes\"",
        ));
    }
    if let Some(s) = opts.steps {
        cfg.train.steps = s;
        cfg.train.warmup_steps = cfg.train.warmup_steps.min(s / 5);
    }
    let size = cfg.clip().map_err(Error::input)?.image_size;
    let seen = class_set(size, PairSet::Seen, PER_CLASS, EVAL_SEED);
    let unseen = class_set(size, PairSet::HeldOut, PER_CLASS * 3, EVAL_SEED + 1);
    let mixed_cfg = ShapesConfig {
        image_size: size,
        ..ShapesConfig::default()
    };
    let pairs: Vec<ShapesSample> = (0..RETRIEVAL_PAIRS as u64)
        .map(|i| shapes::generate(&mixed_cfg, EVAL_SEED + 2, i))
        .collect();
    let eval_dir = opts.out.join("eval");
    for (name, s) in [
        ("zeroshot-seen", &seen),
        ("zeroshot-unseen", &unseen),
        ("retrieval", &pairs),
    ] {
        write_shapes_dir(&eval_dir.join(name), s)?;
    }
    let templates: Vec<String> = shapes::TEMPLATES.iter().map(|t| t.to_string()).collect();
    let seen_classes = shapes::classes(PairSet::Seen);
    let all_classes = shapes::classes(PairSet::All);
    let unseen_classes = shapes::classes(PairSet::HeldOut);

    let device = Device::Cpu;
    let mut task = setup::clip_task(&cfg, &device)?;
    let source = setup::source_for(&cfg, size)?;
    // A quick check during training: seen zero-shot on 3 images per class, t2i R@1 on 200 pairs.
    let quick_zs = to_set(&class_set(size, PairSet::Seen, 3, EVAL_SEED + 3));
    let quick_rt = to_set(&pairs[..200]);
    let (tpl, quick_classes) = (templates.clone(), seen_classes.clone());
    let hook = EvalHook {
        every: (cfg.train.steps / 6).max(1),
        run: Box::new(move |t: &ClipTask| {
            let p = t.pipeline()?;
            let zs = evaluate(&p, &quick_zs, &quick_classes, &tpl)?;
            let rt = evaluate(&p, &quick_rt, &[], &tpl)?;
            Ok(vec![
                (
                    "zeroshot_top1_seen".into(),
                    zs.zeroshot_top1.unwrap_or(f64::NAN),
                ),
                ("t2i_r1_200".into(), rt.retrieval.t2i_r1),
            ])
        }),
    };
    let run_opts = RunOptions {
        run_dir: opts.out.clone(),
        resume: opts.resume,
        progress: opts.progress,
    };
    let t_train = Instant::now();
    let loader = setup::clip_loader(&cfg, &task, source);
    let report = trainer::run(&mut task, &cfg, &run_opts, loader, Some(hook))?;
    let train_seconds = t_train.elapsed().as_secs_f64();

    let p = task.pipeline()?;
    let zs_seen: EvalReport = evaluate(&p, &to_set(&seen), &seen_classes, &templates)?;
    let zs_unseen = evaluate(&p, &to_set(&unseen), &all_classes, &templates)?;
    let zs_unseen_closed = evaluate(&p, &to_set(&unseen), &unseen_classes, &templates)?;
    let rt = evaluate(&p, &to_set(&pairs), &[], &templates)?.retrieval;
    Ok(DemoReport {
        model_dir: report.model_dir,
        wall_seconds: t0.elapsed().as_secs_f64(),
        train_seconds,
        steps: report.steps,
        samples_per_second: report.samples_per_second,
        zeroshot_top1_seen: zs_seen.zeroshot_top1.unwrap_or(f64::NAN),
        zeroshot_top5_seen: zs_seen.zeroshot_top5.unwrap_or(f64::NAN),
        zeroshot_top1_unseen: zs_unseen.zeroshot_top1.unwrap_or(f64::NAN),
        zeroshot_top1_unseen_closed: zs_unseen_closed.zeroshot_top1.unwrap_or(f64::NAN),
        t2i_r1: rt.t2i_r1,
        t2i_r5: rt.t2i_r5,
        t2i_r10: rt.t2i_r10,
        i2t_r1: rt.i2t_r1,
        i2t_r5: rt.i2t_r5,
        i2t_r10: rt.i2t_r10,
        n_retrieval: pairs.len(),
        eval_dir,
    })
}
