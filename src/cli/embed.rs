//! `vlalign embed --model DIR [--image P...] [--text T...] [--json | --out F.npy]`

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vlalign::infer::Pipeline;

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json, preprocessor_config.json).
    #[arg(long)]
    model: PathBuf,
    /// Image files (PNG, JPEG, WebP).
    #[arg(long, num_args = 1..)]
    image: Vec<PathBuf>,
    /// Texts.
    #[arg(long, num_args = 1..)]
    text: Vec<String>,
    /// Print one JSON object: {"images": [{"path", "embedding"}], "texts": [{"text", "embedding"}]}.
    #[arg(long, conflicts_with = "out")]
    json: bool,
    /// Write a float32 .npy of shape [images + texts, dim]: image rows first, then text rows,
    /// each in input order.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    if a.image.is_empty() && a.text.is_empty() {
        bail!("nothing to embed: give --image and/or --text");
    }
    let p = Pipeline::load(&a.model, &a.device.resolve()?)?.into_clip("`vlalign embed`")?;
    let images = p.embed_image_files(&a.image)?.to_vec2::<f32>()?;
    let texts = p.embed_texts(&a.text)?.to_vec2::<f32>()?;
    if let Some(out) = &a.out {
        let dim = images.first().or(texts.first()).map_or(0, Vec::len);
        let rows = images.len() + texts.len();
        let flat: Vec<f32> = images.iter().chain(&texts).flatten().copied().collect();
        vlalign::io::npy::write_f32(out, &flat, rows, dim)?;
        eprintln!(
            "wrote {} ({} image rows, then {} text rows, dim {dim})",
            out.display(),
            images.len(),
            texts.len()
        );
    } else if a.json {
        let obj = json!({
            "images": a.image.iter().zip(&images).map(|(p, e)| json!({"path": p, "embedding": e})).collect::<Vec<_>>(),
            "texts": a.text.iter().zip(&texts).map(|(t, e)| json!({"text": t, "embedding": e})).collect::<Vec<_>>(),
        });
        println!("{obj}");
    } else {
        let preview = |e: &[f32]| {
            let head: Vec<String> = e.iter().take(4).map(|v| format!("{v:+.4}")).collect();
            format!("[{} …] dim {}", head.join(" "), e.len())
        };
        for (p, e) in a.image.iter().zip(&images) {
            println!("image {}  {}", p.display(), preview(e));
        }
        for (t, e) in a.text.iter().zip(&texts) {
            println!("text  {t:?}  {}", preview(e));
        }
    }
    Ok(())
}
