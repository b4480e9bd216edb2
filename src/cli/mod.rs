//! Command-line verbs (DESIGN.md §3), one file each.

mod bench;
mod caption;
mod data;
mod demo;
mod embed;
mod eval;
mod itm;
mod retrieve;
mod train;
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
    /// The main job: generate shapes, train a tiny CLIP, evaluate, write plots and a model.
    Demo(demo::Args),
    /// Generate data sets.
    #[command(subcommand)]
    Data(data::Command),
    /// Train from a config (TOML).
    Train(train::Args),
    /// Zero-shot and retrieval metrics of a model on a manifest.
    Eval(eval::Args),
    /// L2-normalised image and/or text embeddings from a CLIP model directory.
    Embed(embed::Args),
    /// Zero-shot classification of images over a list of labels.
    Zeroshot(zeroshot::Args),
    /// ITM match probability and ITC score of an image against texts (a Q-Former directory).
    Itm(itm::Args),
    /// Captions from a Q-Former's ITG head (greedy or beam search).
    Caption(caption::Args),
    /// The images that best match a text (ITC, optionally reranked by ITM).
    Retrieve(retrieve::Args),
    /// Speed of the reference workloads.
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Data(c) => data::run(c),
        Command::Train(a) => train::run(a, &device),
        Command::Eval(a) => eval::run(a, &device),
        Command::Bench(a) => bench::run(a, &device),
        Command::Embed(a) => embed::run(a, &device),
        Command::Zeroshot(a) => zeroshot::run(a, &device),
        Command::Itm(a) => itm::run(a, &device),
        Command::Caption(a) => caption::run(a, &device),
        Command::Retrieve(a) => retrieve::run(a, &device),
    }
}
