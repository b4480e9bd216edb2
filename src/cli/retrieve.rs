//! `vlalign retrieve --model DIR --query TEXT --images DIR_OR_MANIFEST [--rerank itm] [--top K]`:
//! the images that best match a text — for a CLIP by cosine in the joint space; for a Q-Former
//! by ITC (cosine maximised over queries) or with ITC's top candidates reranked by ITM + ITC
//! (LAVIS's `compute_sim_matrix`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vlalign::data::image::load_rgb;
use vlalign::data::manifest;
use vlalign::infer::Pipeline;

use super::device::DeviceOpt;

/// How ITC's candidates are reranked.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Rerank {
    /// By ITM match logit + ITC score (LAVIS's rerank).
    Itm,
}

#[derive(clap::Args)]
pub struct Args {
    /// CLIP (HF or open_clip) or Q-Former model directory.
    #[arg(long)]
    model: PathBuf,
    /// The text query.
    #[arg(long)]
    query: String,
    /// A directory of images (png/jpg/jpeg/webp) or a manifest (.jsonl/.csv/.tsv).
    #[arg(long)]
    images: PathBuf,
    /// Rerank ITC's best candidates (4 × --top, at least 16) by ITM + ITC (Q-Former only).
    #[arg(long, value_enum)]
    rerank: Option<Rerank>,
    /// How many images to list.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON object: {"query", "rerank", "results": [{"image", "score", "itc", "itm"?}]}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    if a.query.trim().is_empty() {
        bail!("--query is empty");
    }
    let paths = manifest::image_list(&a.images)?;
    if paths.is_empty() {
        bail!("--images {}: no images found", a.images.display());
    }
    let p = match Pipeline::load(&a.model, &a.device.resolve()?)? {
        Pipeline::Clip(clip) => {
            if a.rerank.is_some() {
                bail!("--rerank itm needs a Q-Former (an ITM head); a CLIP ranks by cosine");
            }
            let scores = clip.text_to_image_scores(&paths, &a.query)?;
            let results: Vec<(usize, f32, Option<f32>)> = scores
                .iter()
                .enumerate()
                .map(|(i, &s)| (i, s, None))
                .collect();
            return print(&a, &paths, results, &scores);
        }
        other => other.into_qformer("`vlalign retrieve`")?,
    };
    let images = paths
        .iter()
        .map(|path| load_rgb(path))
        .collect::<vlalign::error::Result<Vec<_>>>()?;
    let emb = p.image_embeds(&images)?;
    let itc = p.itc_scores(&p.itc_image(&emb)?, &p.itc_text(&[a.query.as_str()])?)?; // [N, 1]
    let itc: Vec<f32> = itc.squeeze(1)?.to_vec1()?;
    let top = a.top.max(1).min(paths.len());
    let results: Vec<(usize, f32, Option<f32>)> = match a.rerank {
        Some(Rerank::Itm) => {
            let k = (4 * top).max(16).min(paths.len());
            p.rerank(&emb, &itc, k, |i| (i, a.query.as_str()))?
                .into_iter()
                .map(|r| (r.index, r.score, Some(r.itm)))
                .collect()
        }
        None => (0..paths.len()).map(|i| (i, itc[i], None)).collect(),
    };
    print(&a, &paths, results, &itc)
}

/// Prints the best `--top` of `results` (index, score, ITM probability); `itc` is the first-stage
/// score of every image (the cosine, for a CLIP).
fn print(
    a: &Args,
    paths: &[PathBuf],
    mut results: Vec<(usize, f32, Option<f32>)>,
    itc: &[f32],
) -> Result<()> {
    let top = a.top.max(1).min(paths.len());
    results.sort_by(|x, y| y.1.total_cmp(&x.1));
    results.truncate(top);
    if a.json {
        let list: Vec<_> = results
            .iter()
            .map(|&(i, s, m)| {
                let mut o = json!({"image": paths[i], "score": s, "itc": itc[i]});
                if let Some(m) = m {
                    o["itm"] = json!(m);
                }
                o
            })
            .collect();
        let rerank = a.rerank.map(|Rerank::Itm| "itm");
        println!(
            "{}",
            json!({"query": a.query, "rerank": rerank, "results": list})
        );
    } else {
        for &(i, s, _) in &results {
            println!("{s:+.4}  {}", paths[i].display());
        }
    }
    Ok(())
}
