//! `vlalign index build --model DIR --images DIR_OR_MANIFEST --out INDEX` (an image-search
//! index; over an existing INDEX only new images are embedded) and
//! `vlalign search --index INDEX --query TEXT | --image P [--top K]`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vlalign::data::image::load_rgb;
use vlalign::data::manifest;
use vlalign::infer::index::Index;
use vlalign::infer::Pipeline;

use super::device::DeviceOpt;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Embed a collection of images into an index (incremental: an existing --out gains only
    /// the images it lacks).
    Build(BuildArgs),
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// CLIP model directory (either layout).
    #[arg(long)]
    model: PathBuf,
    /// A directory of images (png/jpg/jpeg/webp) or a manifest (.jsonl/.csv/.tsv).
    #[arg(long)]
    images: PathBuf,
    /// The index directory to write (or extend).
    #[arg(long)]
    out: PathBuf,
    /// Also build an HNSW graph for approximate search (for large collections; an index that
    /// has one keeps it, rebuilt, when extended).
    #[arg(long)]
    approx: bool,
    /// Print one JSON object: {"index", "count", "added", "skipped": [{"path", "error"}]}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(c: Command) -> Result<()> {
    let Command::Build(a) = c;
    let paths = manifest::image_list(&a.images)?;
    if paths.is_empty() {
        bail!("--images {}: no images found", a.images.display());
    }
    let device = a.device.resolve()?;
    let p = Pipeline::load(&a.model, &device)?.into_clip("`vlalign index build`")?;
    let existing = if a.out.exists() {
        Some(Index::load(&a.out, &device)?)
    } else {
        None
    };
    let pb = indicatif::ProgressBar::new(paths.len() as u64);
    if a.json {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut built = Index::build(&p, &a.model, &paths, existing, |n| {
        pb.set_position(n as u64)
    })?;
    pb.finish_and_clear();
    if a.approx && built.index.ann.is_none() {
        built.index.build_ann()?;
    }
    built.index.save(&a.out)?;
    if a.json {
        let skipped: Vec<_> = built
            .skipped
            .iter()
            .map(|(p, e)| json!({"path": p, "error": e}))
            .collect();
        println!(
            "{}",
            json!({"index": a.out, "count": built.index.len(), "added": built.added, "skipped": skipped})
        );
    } else {
        for (p, e) in &built.skipped {
            eprintln!("skipped {}: {e}", p.display());
        }
        println!(
            "{}: {} images ({} added, {} skipped)",
            a.out.display(),
            built.index.len(),
            built.added,
            built.skipped.len()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct SearchArgs {
    /// An index made by `vlalign index build`.
    #[arg(long)]
    index: PathBuf,
    /// A text query.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    query: Option<String>,
    /// An image query (search by example).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The model to embed the query with (default: the one the index was built with).
    #[arg(long)]
    model: Option<PathBuf>,
    /// How many results.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Scan every entry even when the index has an approximate graph.
    #[arg(long)]
    exact: bool,
    /// Candidate list of the approximate search (recall against speed; at least --top).
    #[arg(long, default_value_t = 64)]
    ef: usize,
    /// Print one JSON object: {"query" | "image", "results": [{"path", "score"}]}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn search(a: SearchArgs) -> Result<()> {
    if a.top == 0 || a.ef == 0 {
        bail!("--top and --ef must be at least 1");
    }
    let device = a.device.resolve()?;
    let index = Index::load(&a.index, &device)?;
    let model = a.model.clone().unwrap_or_else(|| index.model.clone());
    let p = Pipeline::load(&model, &device)?.into_clip("`vlalign search`")?;
    let q = match (&a.query, &a.image) {
        (Some(t), _) => {
            if t.trim().is_empty() {
                bail!("--query is empty");
            }
            p.embed_texts(&[t])?
        }
        (None, Some(img)) => p.embed_rgb(&[load_rgb(img)?])?,
        (None, None) => bail!("give --query or --image"),
    };
    let q: Vec<f32> = q.squeeze(0)?.to_vec1()?;
    let hits = if a.exact {
        index.search_exact(&q, a.top)?
    } else {
        index.search(&q, a.top, a.ef)?
    };
    if a.json {
        let results: Vec<_> = hits
            .iter()
            .map(|(i, s)| json!({"path": index.paths[*i], "score": s}))
            .collect();
        let mut obj = json!({"results": results});
        match (&a.query, &a.image) {
            (Some(t), _) => obj["query"] = json!(t),
            (_, img) => obj["image"] = json!(img),
        }
        println!("{obj}");
    } else {
        for (i, s) in hits {
            println!("{s:+.4}  {}", index.paths[i].display());
        }
    }
    Ok(())
}
