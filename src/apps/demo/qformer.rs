//! `vlalign demo --stage qformer`: BLIP-2 stage 1 in miniature (DESIGN.md §5). On the frozen
//! vision tower of the CLIP demo's model (trained first when absent), trains the Q-Former of
//! configs/qformer-tiny.toml with ITC + ITM + ITG on shapes, then measures retrieval by ITC alone
//! and reranked by ITM over 1,000 held-out pairs, and captioning (greedy and beam search) by
//! the share of colour and shape words that are right on single-object images of seen and of
//! never-seen colour–shape compositions.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::{clip, retrieval_pairs, DemoOptions, EVAL_SEED};
use crate::data::image::RgbImage;
use crate::data::shapes::{PairSet, ShapesSample};
use crate::data::shapes_files::class_set;
use crate::error::{Error, Result};
use crate::eval::qformer::{caption_accuracy, retrieval, QformerRetrieval};
use crate::infer::QformerPipeline;
use crate::train::build::Run;
use crate::train::trainer::RunOptions;

/// The stage-1 configuration, compiled in so the binary runs from anywhere.
pub const QFORMER_TINY_TOML: &str = include_str!("../../../configs/qformer-tiny.toml");

/// ITC candidates reranked by ITM per query.
const RERANK_K: usize = 10;
/// Beam width of the beam-search captions.
const BEAMS: usize = 3;
/// Most caption tokens generated.
const MAX_LEN: usize = 16;

#[derive(Clone, Debug, Serialize)]
pub struct CaptionExample {
    pub truth: String,
    pub greedy: String,
    pub beam: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct QformerDemoReport {
    pub model_dir: PathBuf,
    pub clip_model_dir: PathBuf,
    pub wall_seconds: f64,
    pub train_seconds: f64,
    pub steps: u64,
    pub samples_per_second: f64,
    pub n_retrieval: usize,
    pub retrieval: QformerRetrieval,
    pub caption_seen_greedy: f64,
    pub caption_seen_beam: f64,
    pub caption_unseen_greedy: f64,
    pub caption_unseen_beam: f64,
    pub examples: Vec<CaptionExample>,
}

fn images(s: &[ShapesSample]) -> Vec<RgbImage> {
    s.iter().map(|x| x.image.clone()).collect()
}

/// (greedy, beam) word accuracy and the captions, on single-object samples.
fn caption_scores(
    p: &QformerPipeline,
    s: &[ShapesSample],
) -> Result<(f64, f64, Vec<CaptionExample>)> {
    let emb = p.image_embeds(&images(s))?;
    let truths: Vec<(String, String)> = s
        .iter()
        .map(|x| (x.objects[0].color.clone(), x.objects[0].shape.clone()))
        .collect();
    let (greedy_acc, greedy) = caption_accuracy(p, &emb, &truths, 1, MAX_LEN)?;
    let (beam_acc, beam) = caption_accuracy(p, &emb, &truths, BEAMS, MAX_LEN)?;
    let examples = s
        .iter()
        .zip(greedy.into_iter().zip(beam))
        .map(|(x, (greedy, beam))| CaptionExample {
            truth: x.caption.clone(),
            greedy,
            beam,
        })
        .collect();
    Ok((greedy_acc, beam_acc, examples))
}

/// Trains and evaluates stage 1; `opts.config` replaces configs/qformer-tiny.toml (its
/// `qformer.vision_model` is set to the CLIP in `opts.out/model` either way).
pub fn run(opts: &DemoOptions) -> Result<QformerDemoReport> {
    let t0 = Instant::now();
    let clip_dir = opts.out.join("model");
    if !clip_dir.join("model.safetensors").is_file() {
        tracing::info!(
            "no CLIP at {}: running the CLIP demo first",
            clip_dir.display()
        );
        clip::run(&opts.earlier_stage())?;
    }
    let t_stage = Instant::now();
    let mut cfg = opts.config("configs/qformer-tiny.toml", QFORMER_TINY_TOML)?;
    cfg.qformer
        .as_mut()
        .ok_or_else(|| {
            Error::input("the Q-Former demo's config must train a Q-Former ([qformer])")
        })?
        .vision_model = clip_dir.to_string_lossy().into_owned();
    let mut run = Run::new(cfg, &opts.device)?;
    let size = run.task.image_size();
    let run_opts = RunOptions {
        run_dir: opts.out.join("qformer"),
        resume: opts.resume,
        progress: opts.progress,
        comm: crate::dist::single(),
    };
    let t_train = Instant::now();
    let report = run.train(&run_opts, None)?;
    let train_seconds = t_train.elapsed().as_secs_f64();

    let p = QformerPipeline::load(&report.model_dir, &opts.device)?;
    let pairs = retrieval_pairs(size);
    let captions: Vec<String> = pairs.iter().map(|s| s.caption.clone()).collect();
    let retrieval = retrieval(&p, &images(&pairs), &captions, RERANK_K)?;
    let seen = class_set(size, PairSet::Seen, 3, EVAL_SEED);
    let unseen = class_set(size, PairSet::HeldOut, 10, EVAL_SEED + 1);
    let (seen_g, seen_b, mut examples) = caption_scores(&p, &seen)?;
    let (unseen_g, unseen_b, ex_unseen) = caption_scores(&p, &unseen)?;
    examples.truncate(3);
    examples.extend(ex_unseen.into_iter().take(3));
    tracing::info!(
        "stage 1 took {:.0} s (training {train_seconds:.0} s)",
        t_stage.elapsed().as_secs_f64()
    );
    Ok(QformerDemoReport {
        model_dir: report.model_dir,
        clip_model_dir: clip_dir,
        wall_seconds: t0.elapsed().as_secs_f64(),
        train_seconds,
        steps: report.steps,
        samples_per_second: report.samples_per_second,
        n_retrieval: pairs.len(),
        retrieval,
        caption_seen_greedy: seen_g,
        caption_seen_beam: seen_b,
        caption_unseen_greedy: unseen_g,
        caption_unseen_beam: unseen_b,
        examples,
    })
}
