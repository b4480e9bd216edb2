//! `vlalign itm --model DIR --image P --text T... [--json]`: the ITM match probability and the
//! ITC score (cosine maximised over queries, no temperature, as HF `Blip2ForImageTextRetrieval`
//! returns it) of one image against each text.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vlalign::data::image::load_rgb;
use vlalign::infer::Pipeline;

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Q-Former model directory (Blip2ForImageTextRetrieval layout).
    #[arg(long)]
    model: PathBuf,
    /// The image.
    #[arg(long)]
    image: PathBuf,
    /// Texts to score against the image.
    #[arg(long, num_args = 1.., required = true)]
    text: Vec<String>,
    /// Print one JSON object: {"image": P, "results": [{"text", "itm", "itc"}]} in input order.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    if a.text.iter().any(|t| t.trim().is_empty()) {
        bail!("--text has an empty text");
    }
    let p = Pipeline::load(&a.model, &a.device.resolve()?)?.into_qformer("`vlalign itm`")?;
    let img = load_rgb(&a.image)?;
    let emb = p.image_embeds(&[img])?;
    let itc = p.itc_scores(&p.itc_image(&emb)?, &p.itc_text(&a.text)?)?;
    let itc: Vec<f32> = itc.squeeze(0)?.to_vec1()?;
    let rows = emb.repeat((a.text.len(), 1, 1))?;
    let itm = p.itm_probs(&rows, &a.text)?;
    if a.json {
        let results: Vec<_> = a
            .text
            .iter()
            .zip(itm.iter().zip(&itc))
            .map(|(t, (m, c))| json!({"text": t, "itm": m, "itc": c}))
            .collect();
        println!("{}", json!({"image": a.image, "results": results}));
    } else {
        println!("{}", a.image.display());
        for (t, (m, c)) in a.text.iter().zip(itm.iter().zip(&itc)) {
            println!("  itm {:6.2}%  itc {c:+.4}  {t}", m * 100.0);
        }
    }
    Ok(())
}
