//! `vlalign eval --model DIR --data MANIFEST [--json]`

use std::path::PathBuf;

use anyhow::{bail, Result};
use vlalign::data::shapes;
use vlalign::eval::qformer::{self, QformerReport};
use vlalign::eval::report::{evaluate, EvalSet};
use vlalign::infer::{ClipPipeline, Pipeline, QformerPipeline};

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Manifest (.jsonl/.csv/.tsv) of image–caption pairs; single-object entries with
    /// `objects` (shapes manifests) also give zero-shot classes "COLOR SHAPE".
    #[arg(long)]
    data: PathBuf,
    /// Prompt template(s) with {} for the class (default: the shapes templates for shapes
    /// manifests, else "a photo of a {}.").
    #[arg(long)]
    template: Vec<String>,
    /// Comma-separated class names to classify among (default: the classes in the manifest).
    #[arg(long)]
    classes: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Q-Former directories: ITC candidates reranked by ITM per query.
    #[arg(long, default_value_t = 10)]
    rerank_k: usize,
    /// Q-Former directories: beam width of the beam-search captions.
    #[arg(long, default_value_t = 3)]
    beams: usize,
    #[command(flatten)]
    device: DeviceOpt,
}

/// Most caption tokens generated for the caption figures.
const CAPTION_MAX_LEN: usize = 20;

/// A Q-Former directory: retrieval by ITC and ITM-reranked, and caption word accuracy on the
/// single-object images (seen and unseen shapes compositions apart).
fn run_qformer(a: &Args, set: &EvalSet, p: &QformerPipeline) -> Result<()> {
    let r: QformerReport = qformer::evaluate(p, set, a.rerank_k, a.beams, CAPTION_MAX_LEN)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("{} images ({} skipped)", r.n_images, r.n_skipped);
    for (name, m) in [
        ("ITC", &r.itc),
        (&*format!("ITC top-{} + ITM", r.k), &r.itm_reranked),
    ] {
        println!(
            "{name:16} image→text R@1 {:5.1}%  R@5 {:5.1}%   text→image R@1 {:5.1}%  R@5 {:5.1}%",
            m.i2t_r1 * 100.0,
            m.i2t_r5 * 100.0,
            m.t2i_r1 * 100.0,
            m.t2i_r5 * 100.0
        );
    }
    for (k, v) in [
        ("caption_seen_greedy", r.caption_seen_greedy),
        ("caption_seen_beam", r.caption_seen_beam),
        ("caption_unseen_greedy", r.caption_unseen_greedy),
        ("caption_unseen_beam", r.caption_unseen_beam),
    ] {
        if let Some(x) = v {
            println!("{k:24} {:5.1}% of colour and shape words right", x * 100.0);
        }
    }
    Ok(())
}

/// A CLIP directory: zero-shot over the set's classes and retrieval over its pairs.
fn run_clip(a: &Args, set: &EvalSet, p: &ClipPipeline) -> Result<()> {
    let classes = match &a.classes {
        Some(c) => {
            let v: Vec<String> = c
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if v.is_empty() {
                bail!("--classes is empty");
            }
            v
        }
        None => set.class_names(),
    };
    let templates = if !a.template.is_empty() {
        a.template.clone()
    } else if set.classes.iter().any(Option::is_some) {
        shapes::TEMPLATES.iter().map(|t| t.to_string()).collect()
    } else {
        vec!["a photo of a {}.".to_string()]
    };
    let r = evaluate(p, set, &classes, &templates)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
    println!(
        "{} images ({} skipped), {} classes, {} zero-shot images",
        r.n_images,
        r.n_skipped,
        r.classes.len(),
        r.n_zeroshot
    );
    println!(
        "zero-shot   top-1 {:>7}   top-5 {:>7}",
        pct(r.zeroshot_top1),
        pct(r.zeroshot_top5)
    );
    let m = &r.retrieval;
    println!(
        "image→text  R@1 {:5.1}%  R@5 {:5.1}%  R@10 {:5.1}%  mean rank {:.1}",
        m.i2t_r1 * 100.0,
        m.i2t_r5 * 100.0,
        m.i2t_r10 * 100.0,
        m.i2t_mean_rank
    );
    println!(
        "text→image  R@1 {:5.1}%  R@5 {:5.1}%  R@10 {:5.1}%  mean rank {:.1}",
        m.t2i_r1 * 100.0,
        m.t2i_r5 * 100.0,
        m.t2i_r10 * 100.0,
        m.t2i_mean_rank
    );
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let set = EvalSet::from_manifest(&a.data)?;
    for why in set.skipped.iter().take(10) {
        tracing::warn!("skipped: {why}");
    }
    match Pipeline::load(&a.model, &a.device.resolve()?)? {
        Pipeline::Clip(p) => run_clip(&a, &set, &p),
        other => run_qformer(&a, &set, &other.into_qformer("`vlalign eval`")?),
    }
}
