//! Command-line verbs (DESIGN.md §3), one file each.

mod embed;
mod zeroshot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vlalign",
    version,
    about = "Train, evaluate and serve vision-language alignment models"
)]
pub struct Cli {
    /// Log progress (info level); RUST_LOG overrides.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// L2-normalised image and/or text embeddings from a CLIP model directory.
    Embed(embed::Args),
    /// Zero-shot classification of images over a list of labels.
    Zeroshot(zeroshot::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    match cli.command {
        Command::Embed(a) => embed::run(a, &device),
        Command::Zeroshot(a) => zeroshot::run(a, &device),
    }
}
