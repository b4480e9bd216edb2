//! `vlalign retrieve --model DIR --query TEXT --images DIR_OR_MANIFEST [--rerank itm] [--top K]`:
//! the images that best match a text, by ITC (cosine maximised over queries) or with ITC's
//! top candidates reranked by ITM + ITC (LAVIS's `compute_sim_matrix`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::json;
use vlalign::data::image::load_rgb;
use vlalign::data::manifest;
use vlalign::qformer_pipeline::{topk_rows, QformerPipeline};

#[derive(clap::Args)]
pub struct Args {
    /// Q-Former model directory.
    #[arg(long)]
    model: PathBuf,
    /// The text query.
    #[arg(long)]
    query: String,
    /// A directory of images (png/jpg/jpeg/webp) or a manifest (.jsonl/.csv/.tsv).
    #[arg(long)]
    images: PathBuf,
    /// `itm`: rerank ITC's best candidates (4 × --top, at least 16) by ITM + ITC.
    #[arg(long)]
    rerank: Option<String>,
    /// How many images to list.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON object: {"query", "rerank", "results": [{"image", "score", "itc", "itm"?}]}.
    #[arg(long)]
    json: bool,
}

fn image_paths(src: &Path) -> Result<Vec<PathBuf>> {
    if src.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(src)
            .with_context(|| format!("cannot read {}", src.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    ["png", "jpg", "jpeg", "webp"].contains(&e.to_lowercase().as_str())
                })
            })
            .collect();
        v.sort();
        return Ok(v);
    }
    if src.is_file() {
        return Ok(manifest::read(src)?.into_iter().map(|e| e.image).collect());
    }
    bail!("--images {}: no such directory or manifest", src.display())
}

pub fn run(a: Args, device: &Device) -> Result<()> {
    let rerank = match a.rerank.as_deref() {
        None => false,
        Some("itm") => true,
        Some(o) => bail!("--rerank {o:?}: the only reranker is \"itm\""),
    };
    if a.query.trim().is_empty() {
        bail!("--query is empty");
    }
    let paths = image_paths(&a.images)?;
    if paths.is_empty() {
        bail!("--images {}: no images found", a.images.display());
    }
    let p = QformerPipeline::load(&a.model, device)?;
    let images = paths
        .iter()
        .map(|path| load_rgb(path))
        .collect::<vlalign::error::Result<Vec<_>>>()?;
    let emb = p.image_embeds(&images)?;
    let itc = p.itc_scores(&p.itc_image(&emb)?, &p.itc_text(&[a.query.as_str()])?)?; // [N, 1]
    let itc_t = itc.t()?.contiguous()?;
    let itc_v: Vec<f32> = itc_t.squeeze(0)?.to_vec1()?;
    let top = a.top.max(1).min(paths.len());
    let mut results: Vec<(usize, f32, Option<f32>)> = if rerank {
        let k = (4 * top).max(16).min(paths.len());
        let cand = topk_rows(&itc_t, k)?.remove(0);
        let pairs: Vec<(usize, &str)> = cand.iter().map(|&i| (i, a.query.as_str())).collect();
        cand.iter()
            .zip(p.match_logits(&emb, &pairs)?)
            .map(|(&i, m)| (i, m + itc_v[i], Some(m)))
            .collect()
    } else {
        (0..paths.len()).map(|i| (i, itc_v[i], None)).collect()
    };
    results.sort_by(|x, y| y.1.total_cmp(&x.1));
    results.truncate(top);
    if a.json {
        let list: Vec<_> = results
            .iter()
            .map(|&(i, s, m)| {
                let mut o = json!({"image": paths[i], "score": s, "itc": itc_v[i]});
                if let Some(m) = m {
                    o["itm"] = json!(m);
                }
                o
            })
            .collect();
        println!(
            "{}",
            json!({"query": a.query, "rerank": a.rerank, "results": list})
        );
    } else {
        for &(i, s, _) in &results {
            println!("{s:+.4}  {}", paths[i].display());
        }
    }
    Ok(())
}
