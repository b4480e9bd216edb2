//! `vlalign eval --model DIR --data MANIFEST [--json]`

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use vlalign::data::image::RgbImage;
use vlalign::data::shapes;
use vlalign::eval::qformer;
use vlalign::eval::report::{evaluate, EvalSet};
use vlalign::pipeline::ClipPipeline;
use vlalign::qformer_pipeline::QformerPipeline;

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
}

/// Single-object images and their (colour, shape).
type CaptionGroup = (Vec<RgbImage>, Vec<(String, String)>);

fn is_qformer_dir(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("model_type")
                .and_then(|m| m.as_str())
                .map(|m| m == "blip-2")
        })
        .unwrap_or(false)
}

/// A Q-Former directory: retrieval by ITC and ITM-reranked, and caption word accuracy on the
/// single-object images (seen and unseen shapes compositions apart).
fn run_qformer(a: &Args, set: &EvalSet, device: &Device) -> Result<()> {
    let p = QformerPipeline::load(&a.model, device)?;
    let r = qformer::retrieval(&p, &set.images, &set.captions, a.rerank_k)?;
    let mut groups: [CaptionGroup; 2] = Default::default();
    for (img, class) in set.images.iter().zip(&set.classes) {
        let Some((c, sh)) = class.as_deref().and_then(|c| c.split_once(' ')) else {
            continue;
        };
        let g = usize::from(shapes::is_held_out(c, sh));
        groups[g].0.push(img.clone());
        groups[g].1.push((c.to_string(), sh.to_string()));
    }
    let mut caps = serde_json::Map::new();
    for (name, (imgs, truths)) in ["seen", "unseen"].iter().zip(&groups) {
        if imgs.is_empty() {
            continue;
        }
        let emb = p.image_embeds(imgs)?;
        for (kind, beams) in [("greedy", 1), ("beam", a.beams)] {
            let (acc, _) = qformer::caption_accuracy(&p, &emb, truths, beams, 20)?;
            caps.insert(format!("caption_{name}_{kind}"), serde_json::json!(acc));
        }
        caps.insert(format!("n_caption_{name}"), serde_json::json!(imgs.len()));
    }
    if a.json {
        let mut o = serde_json::json!({
            "n_images": set.images.len(), "n_skipped": set.skipped.len(), "k": r.k,
            "itc": r.itc, "itm_reranked": r.itm_reranked,
        });
        o.as_object_mut().expect("object").extend(caps);
        println!("{o}");
        return Ok(());
    }
    println!(
        "{} images ({} skipped)",
        set.images.len(),
        set.skipped.len()
    );
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
    for (k, v) in caps {
        if let Some(x) = v.as_f64().filter(|_| k.starts_with("caption_")) {
            println!("{k:24} {:5.1}% of colour and shape words right", x * 100.0);
        }
    }
    Ok(())
}

pub fn run(a: Args, device: &Device) -> Result<()> {
    let set = EvalSet::from_manifest(&a.data)?;
    for why in set.skipped.iter().take(10) {
        tracing::warn!("skipped: {why}");
    }
    if is_qformer_dir(&a.model) {
        return run_qformer(&a, &set, device);
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
