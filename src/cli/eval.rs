//! `vlalign eval --model DIR --data MANIFEST [--json]`

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use vlalign::data::shapes;
use vlalign::eval::report::{evaluate, EvalSet};
use vlalign::pipeline::ClipPipeline;

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
}

pub fn run(a: Args, device: &Device) -> Result<()> {
    let set = EvalSet::from_manifest(&a.data)?;
    for why in set.skipped.iter().take(10) {
        tracing::warn!("skipped: {why}");
    }
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
    let p = ClipPipeline::load(&a.model, device)?;
    let r = evaluate(&p, &set, &classes, &templates)?;
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
