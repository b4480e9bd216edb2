//! `vlalign caption --model DIR --image P... [--beams K] [--max-len N] [--json]`: captions from
//! the Q-Former's ITG head, greedy (`--beams 1`) or by beam search.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vlalign::data::image::load_rgb;
use vlalign::infer::Pipeline;

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Q-Former model directory with an ITG head (as `vlalign train` writes it).
    #[arg(long)]
    model: PathBuf,
    /// Image file(s) to caption.
    #[arg(long, num_args = 1.., required = true)]
    image: Vec<PathBuf>,
    /// Beam width; 1 = greedy.
    #[arg(long, default_value_t = 3)]
    beams: usize,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 20)]
    max_len: usize,
    /// Print one JSON object: {"captions": [{"image", "caption", "score"}]} in input order.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    if a.beams == 0 || a.max_len == 0 {
        bail!("--beams and --max-len must be at least 1");
    }
    let p = Pipeline::load(&a.model, &a.device.resolve()?)?.into_qformer("`vlalign caption`")?;
    let images = a
        .image
        .iter()
        .map(|path| load_rgb(path))
        .collect::<vlalign::error::Result<Vec<_>>>()?;
    let caps = p.caption(&p.image_embeds(&images)?, a.beams, a.max_len)?;
    if a.json {
        let list: Vec<_> = a
            .image
            .iter()
            .zip(&caps)
            .map(|(i, c)| json!({"image": i, "caption": c.text, "score": c.score}))
            .collect();
        println!("{}", json!({"captions": list}));
    } else {
        for (i, c) in a.image.iter().zip(&caps) {
            println!("{}: {}", i.display(), c.text);
        }
    }
    Ok(())
}
