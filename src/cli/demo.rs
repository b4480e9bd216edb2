//! `vlalign demo [--out DIR] [--json] [--resume]`

use std::path::PathBuf;

use anyhow::Result;
use vlalign::demo::{self, DemoOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Run directory: checkpoints, metrics, plots, eval data and model/.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Continue an interrupted demo from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Train with this config instead of the built-in configs/clip-tiny.toml (data.source must
    /// be "shapes").
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides the number of training steps (the default reaches the targets).
    #[arg(long)]
    steps: Option<u64>,
    /// End by printing one JSON object (model_dir, wall_seconds, zeroshot_top1_seen, ...).
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let r = demo::run(&DemoOptions {
        out: a.out.clone(),
        config: a.config.clone(),
        resume: a.resume,
        steps: a.steps,
        progress: true,
    })?;
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
