//! `vlalign demo` (stage `clip`): generates shapes, trains the tiny CLIP of
//! configs/clip-tiny.toml, evaluates zero-shot accuracy on held-out images of seen and of
//! never-seen colour–shape compositions and retrieval on 1,000 held-out pairs, and leaves a
//! model directory that `embed`, `zeroshot` and `eval` accept.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::{retrieval_pairs, DemoOptions, EVAL_SEED};
use crate::data::shapes::{self, PairSet, ShapesSample};
use crate::data::shapes_files::{class_set, write_shapes_dir};
use crate::error::{Error, Result};
use crate::eval::report::{evaluate, EvalReport, EvalSet};
use crate::train::build::{AnyTask, Run};
use crate::train::trainer::{EvalHook, RunOptions};

/// The demo's configuration, compiled in so the binary runs from anywhere.
pub const CLIP_TINY_TOML: &str = include_str!("../../../configs/clip-tiny.toml");

/// Single-object evaluation images per class.
const PER_CLASS: usize = 12;

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

/// Zero-shot top-1 (the only figure a set of single-object images can lack: none labelled).
fn top1(r: &EvalReport) -> Result<f64> {
    r.zeroshot_top1
        .ok_or_else(|| Error::input("the zero-shot set has no single-object image"))
}

pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let t0 = Instant::now();
    let cfg = opts.config("configs/clip-tiny.toml", CLIP_TINY_TOML)?;
    let every = (cfg.train.steps / 6).max(1);
    let mut run = Run::new(cfg, &opts.device)?;
    let size = run.task.image_size();
    let seen = class_set(size, PairSet::Seen, PER_CLASS, EVAL_SEED);
    let unseen = class_set(size, PairSet::HeldOut, PER_CLASS * 3, EVAL_SEED + 1);
    let pairs = retrieval_pairs(size);
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

    // A quick check during training: seen zero-shot on 3 images per class, t2i R@1 on 200 pairs.
    let quick_zs = to_set(&class_set(size, PairSet::Seen, 3, EVAL_SEED + 3));
    let quick_rt = to_set(&pairs[..200]);
    let (tpl, quick_classes) = (templates.clone(), seen_classes.clone());
    let hook = EvalHook {
        every,
        run: Box::new(move |t: &AnyTask| {
            let p = t
                .as_clip()
                .ok_or_else(|| Error::input("the CLIP demo trains a CLIP"))?
                .pipeline()?;
            let zs = evaluate(&p, &quick_zs, &quick_classes, &tpl)?;
            let rt = evaluate(&p, &quick_rt, &[], &tpl)?;
            Ok(vec![
                ("zeroshot_top1_seen".into(), top1(&zs)?),
                ("t2i_r1_200".into(), rt.retrieval.t2i_r1),
            ])
        }),
    };
    let run_opts = RunOptions {
        run_dir: opts.out.clone(),
        resume: opts.resume,
        progress: opts.progress,
        comm: crate::dist::single(),
    };
    let t_train = Instant::now();
    let report = run.train(&run_opts, Some(hook))?;
    let train_seconds = t_train.elapsed().as_secs_f64();

    let p = run
        .task
        .as_clip()
        .ok_or_else(|| {
            Error::input("the CLIP demo's config must train a CLIP ([model] or [finetune])")
        })?
        .pipeline()?;
    let zs_seen = evaluate(&p, &to_set(&seen), &seen_classes, &templates)?;
    let zs_unseen = evaluate(&p, &to_set(&unseen), &all_classes, &templates)?;
    let zs_unseen_closed = evaluate(&p, &to_set(&unseen), &unseen_classes, &templates)?;
    let rt = evaluate(&p, &to_set(&pairs), &[], &templates)?.retrieval;
    Ok(DemoReport {
        model_dir: report.model_dir,
        wall_seconds: t0.elapsed().as_secs_f64(),
        train_seconds,
        steps: report.steps,
        samples_per_second: report.samples_per_second,
        zeroshot_top1_seen: top1(&zs_seen)?,
        zeroshot_top5_seen: zs_seen.zeroshot_top5.unwrap_or(0.0),
        zeroshot_top1_unseen: top1(&zs_unseen)?,
        zeroshot_top1_unseen_closed: top1(&zs_unseen_closed)?,
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
