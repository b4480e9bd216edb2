//! `vlalign train --config FILE [--data SRC] [--out RUN] [--resume] [--steps N]`

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use vlalign::config::TrainConfig;
use vlalign::train::qformer_task::QformerTask;
use vlalign::train::setup;
use vlalign::train::trainer::{self, RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Training config (TOML), e.g. configs/clip-tiny.toml.
    #[arg(long)]
    config: PathBuf,
    /// Overrides data.source: "shapes", a manifest (.jsonl/.csv/.tsv) or tar shards.
    #[arg(long)]
    data: Option<String>,
    /// Run directory (checkpoints, metrics.jsonl, plots, model/). Default: runs/<config name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Overrides train.steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Print one JSON object with the run's summary at the end.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, device: &Device) -> Result<()> {
    let mut cfg = TrainConfig::from_file(&a.config)?;
    if let Some(d) = a.data {
        cfg.data.source = d;
    }
    if let Some(s) = a.steps {
        cfg.train.steps = s;
    }
    let out = a.out.unwrap_or_else(|| {
        let stem = a
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or("run".into());
        PathBuf::from("runs").join(stem)
    });
    let opts = RunOptions {
        run_dir: out,
        resume: a.resume,
        progress: true,
    };
    let r = if cfg.qformer.is_some() {
        let mut task = QformerTask::new(&cfg, device)?;
        let size = task.config.vision.image_size();
        let source = setup::source_for(&cfg, size)?;
        let loader =
            setup::loader_for(&cfg, task.processor.clone(), task.tokenizer.clone(), source);
        trainer::run(&mut task, &cfg, &opts, loader, None)?
    } else {
        let size = cfg.clip().map_err(anyhow::Error::msg)?.image_size;
        let source = setup::source_for(&cfg, size)?;
        let mut task = setup::clip_task(&cfg, device)?;
        let loader = setup::clip_loader(&cfg, &task, source);
        trainer::run(&mut task, &cfg, &opts, loader, None)?
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model_dir": r.model_dir, "steps": r.steps, "resumed_from": r.resumed_from,
                "last_loss": r.last_loss, "wall_seconds": r.wall_seconds,
                "samples_per_second": r.samples_per_second, "skipped_samples": r.skipped_samples,
            })
        );
    } else {
        println!(
            "trained {} steps (loss {:.4}, {:.0} samples/s); model in {}",
            r.steps,
            r.last_loss,
            r.samples_per_second,
            r.model_dir.display()
        );
    }
    Ok(())
}
