//! `vlalign convert --from OPEN_CLIP_DIR --to HF_DIR`

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// An open_clip model directory (open_clip_config.json, open_clip_model.safetensors) with a
    /// ViT image tower.
    #[arg(long)]
    from: PathBuf,
    /// The transformers CLIPModel directory to write (must not exist).
    #[arg(long)]
    to: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let done = vlalign::infer::convert::open_clip_to_hf(&a.from, &a.to)?;
    for note in &done.notes {
        eprintln!("note: {note}");
    }
    println!(
        "wrote {} ({} tensors, transformers CLIPModel layout)",
        a.to.display(),
        done.tensors
    );
    Ok(())
}
