//! Command-line verbs (DESIGN.md §3), one file each: parse, call the library, print.

mod bench;
mod capfilt;
mod caption;
mod convert;
mod data;
mod demo;
mod device;
mod embed;
mod eval;
mod index;
mod itm;
mod retrieve;
mod serve;
mod train;
mod zeroshot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vlalign",
    version,
    about = "Train, evaluate and serve vision-language alignment models (CLIP, the BLIP-2 Q-Former)",
    after_help = "Model directories use the Hugging Face layout (config.json, model.safetensors, \
                  tokenizer.json, preprocessor_config.json); open_clip directories \
                  (open_clip_config.json, open_clip_model.safetensors) load too. Start with \
                  `vlalign demo`."
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
    /// The main job: generate shapes, train a tiny CLIP (or, --stage qformer, a BLIP-2 Q-Former
    /// on it), evaluate, write plots and a model directory.
    Demo(demo::Args),
    /// Generate data sets.
    #[command(subcommand)]
    Data(data::Command),
    /// Train from a config (TOML): a CLIP ([model]) or a BLIP-2 Q-Former ([qformer]).
    Train(train::Args),
    /// Metrics of a model on a manifest: zero-shot and retrieval (CLIP); ITC and ITM-reranked
    /// retrieval and caption accuracy (Q-Former).
    Eval(eval::Args),
    /// L2-normalised image and/or text embeddings from a CLIP model directory.
    Embed(embed::Args),
    /// Zero-shot classification of images over a list of labels (CLIP).
    Zeroshot(zeroshot::Args),
    /// ITM match probability and ITC score of an image against texts (Q-Former).
    Itm(itm::Args),
    /// Captions from a Q-Former's ITG head or a BLIP-2 model's language model.
    Caption(caption::Args),
    /// Answers a question about an image with a BLIP-2 model ("Question: {} Answer:").
    Ask(caption::AskArgs),
    /// BLIP's CapFilt: caption every image of a manifest, keep the original and synthetic
    /// captions that a Q-Former's ITM head says match, write a new manifest.
    Capfilt(capfilt::Args),
    /// The images that best match a text: by cosine (CLIP) or ITC, optionally reranked by ITM
    /// (Q-Former).
    Retrieve(retrieve::Args),
    /// An HTTP API over a model directory: embeddings (also OpenAI's), zero-shot, rerank,
    /// ITM and captions, with dynamic batching, limits and metrics.
    Serve(serve::Args),
    /// Image-search indexes.
    #[command(subcommand)]
    Index(index::Command),
    /// The indexed images that best match a text (or an image), by CLIP cosine.
    Search(index::SearchArgs),
    /// Speed of the reference workloads.
    Bench(bench::Args),
    /// Write an open_clip ViT checkpoint as a transformers CLIPModel directory.
    Convert(convert::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Data(c) => data::run(c),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Zeroshot(a) => zeroshot::run(a),
        Command::Itm(a) => itm::run(a),
        Command::Caption(a) => caption::run(a),
        Command::Ask(a) => caption::ask(a),
        Command::Capfilt(a) => capfilt::run(a),
        Command::Retrieve(a) => retrieve::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Index(c) => index::run(c),
        Command::Search(a) => index::search(a),
    }
}
