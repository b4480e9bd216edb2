//! `vlalign demo [--out DIR] [--json] [--resume] [--stage clip|qformer|blip2]`

use std::path::PathBuf;

use anyhow::Result;
use vlalign::apps::demo::{self, DemoOptions};

use super::device::DeviceOpt;

/// Which stage of the demo runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Stage {
    /// Contrastive pretraining of a tiny CLIP.
    Clip,
    /// BLIP-2 stage 1: a Q-Former on the frozen vision tower of the CLIP in --out (trained
    /// first when absent).
    Qformer,
    /// BLIP-2 stage 2: the stage-1 Q-Former in --out bridged to the frozen SmolLM2-135M
    /// (tools/fetch_smollm2.sh); the earlier stages run first when absent.
    Blip2,
}

#[derive(clap::Args)]
pub struct Args {
    /// Run directory: checkpoints, metrics, plots, eval data and model/.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Continue an interrupted demo from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Train with this config instead of the stage's built-in configs/clip-tiny.toml,
    /// configs/qformer-tiny.toml or configs/blip2-smollm2.toml (data.source must be "shapes").
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides train.steps (the warm-up is cut to at most a fifth of it); the default reaches
    /// the figures in the README.
    #[arg(long)]
    steps: Option<u64>,
    /// End by printing one JSON object (model_dir, wall_seconds, zeroshot_top1_seen, ...).
    #[arg(long)]
    json: bool,
    /// The stage to run.
    #[arg(long, value_enum, default_value_t = Stage::Clip)]
    stage: Stage,
    #[command(flatten)]
    device: DeviceOpt,
}

fn run_blip2(a: &Args, opts: &DemoOptions) -> Result<()> {
    let r = demo::blip2::run(opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let pct = |x: f64| format!("{:5.1}%", x * 100.0);
    println!();
    println!(
        "vlalign demo --stage blip2: the stage-1 Q-Former feeding the frozen {} ({} steps, {:.0} s \
         training, {:.0} s in all)",
        r.language_model.display(),
        r.steps,
        r.train_seconds,
        r.wall_seconds
    );
    println!(
        "  caption word accuracy (colour + shape), seen compositions ({})   {}",
        r.n_seen,
        pct(r.caption_accuracy_seen)
    );
    println!(
        "  caption word accuracy (colour + shape), unseen compositions ({}) {}",
        r.n_unseen,
        pct(r.caption_accuracy_unseen)
    );
    println!(
        "  ask \"what colour is the {{shape}}?\" (never trained on questions)   {}",
        pct(r.ask_colour_accuracy)
    );
    println!(
        "  ask \"what shape is it?\"                                           {}",
        pct(r.ask_shape_accuracy)
    );
    for e in &r.examples {
        println!(
            "  {:<40} → {:?} | colour: {:?} | shape: {:?}",
            e.truth, e.caption, e.colour_answer, e.shape_answer
        );
    }
    println!("  model: {}", r.model_dir.display());
    Ok(())
}

fn run_qformer(a: &Args, opts: &DemoOptions) -> Result<()> {
    let r = demo::qformer::run(opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let pct = |x: f64| format!("{:5.1}%", x * 100.0);
    let (itc, itm) = (&r.retrieval.itc, &r.retrieval.itm_reranked);
    println!();
    println!(
        "vlalign demo --stage qformer: BLIP-2 stage 1 on the frozen CLIP tower ({} steps, {:.0} s training, {:.0} s in all)",
        r.steps, r.train_seconds, r.wall_seconds
    );
    println!(
        "  retrieval over {} held-out pairs          R@1 text→image  image→text",
        r.n_retrieval
    );
    println!(
        "    ITC (max over queries)                        {}      {}",
        pct(itc.t2i_r1),
        pct(itc.i2t_r1)
    );
    println!(
        "    ITC top-{} reranked by ITM + ITC                {}      {}",
        r.retrieval.k,
        pct(itm.t2i_r1),
        pct(itm.i2t_r1)
    );
    println!("  captions: colour + shape words right            greedy   beam");
    println!(
        "    seen compositions (42 classes)                {}  {}",
        pct(r.caption_seen_greedy),
        pct(r.caption_seen_beam)
    );
    println!(
        "    unseen compositions (6 classes)               {}  {}",
        pct(r.caption_unseen_greedy),
        pct(r.caption_unseen_beam)
    );
    for e in &r.examples {
        println!("    {:45} → {}", e.truth, e.beam);
    }
    println!("model directory: {}", r.model_dir.display());
    println!(
        "try:   vlalign caption --model {} --image {}/eval/zeroshot-seen/images/000001.png",
        r.model_dir.display(),
        a.out.display()
    );
    println!(
        "       vlalign retrieve --model {} --query \"a red circle\" --images {}/eval/zeroshot-seen/images --rerank itm",
        r.model_dir.display(),
        a.out.display()
    );
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let opts = DemoOptions {
        out: a.out.clone(),
        config: a.config.clone(),
        resume: a.resume,
        steps: a.steps,
        progress: true,
        device: a.device.resolve()?,
    };
    match a.stage {
        Stage::Qformer => return run_qformer(&a, &opts),
        Stage::Blip2 => return run_blip2(&a, &opts),
        Stage::Clip => {}
    }
    let r = demo::clip::run(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let pct = |x: f64| format!("{:5.1}%", x * 100.0);
    println!();
    println!(
        "vlalign demo: tiny CLIP on synthetic shapes ({} steps, {:.0} s training, {:.0} s in all)",
        r.steps, r.train_seconds, r.wall_seconds
    );
    println!(
        "  zero-shot top-1, seen compositions (42 classes)         {}   (top-5 {})",
        pct(r.zeroshot_top1_seen),
        pct(r.zeroshot_top5_seen)
    );
    println!(
        "  zero-shot top-1, unseen compositions among all 48       {}   (chance  2.1%)",
        pct(r.zeroshot_top1_unseen)
    );
    println!(
        "  zero-shot top-1, unseen compositions among the 6 unseen {}   (chance 16.7%)",
        pct(r.zeroshot_top1_unseen_closed)
    );
    println!(
        "  text→image R@1 / R@5 / R@10 over {} held-out pairs    {} {} {}",
        r.n_retrieval,
        pct(r.t2i_r1),
        pct(r.t2i_r5),
        pct(r.t2i_r10)
    );
    println!(
        "  image→text R@1 / R@5 / R@10                            {} {} {}",
        pct(r.i2t_r1),
        pct(r.i2t_r5),
        pct(r.i2t_r10)
    );
    println!("model directory: {}", r.model_dir.display());
    println!(
        "plots: {}/loss.png, {}/metrics.png",
        a.out.display(),
        a.out.display()
    );
    println!("try:   vlalign zeroshot --model {} --image {}/zeroshot-seen/images/000001.png --labels \"red circle,blue square,green star\"", r.model_dir.display(), r.eval_dir.display());
    println!(
        "       vlalign eval --model {} --data {}/retrieval/manifest.jsonl",
        r.model_dir.display(),
        r.eval_dir.display()
    );
    Ok(())
}
