//! `vlalign train --config FILE [--data SRC] [--out RUN] [--resume] [--steps N]`

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use vlalign::dist::Comm;
use vlalign::train::build::Run;
use vlalign::train::config::TrainConfig;
use vlalign::train::trainer::RunOptions;

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Training config (TOML), e.g. configs/clip-tiny.toml or configs/qformer-tiny.toml.
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
    /// Overrides train.steps (the warm-up is cut to at most a fifth of it).
    #[arg(long)]
    steps: Option<u64>,
    /// Print one JSON object with the run's summary at the end.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    #[cfg(feature = "mpi")]
    if vlalign::dist::launched_size().is_some() {
        let mpi = Arc::new(vlalign::dist::mpi::MpiComm::init()?);
        let result = on_ranks(a, &mpi);
        if let Err(e) = &result {
            if mpi.size() > 1 {
                // The other ranks would wait for this one in their next collective.
                eprintln!("error: {e:#} (rank {} of {})", mpi.rank(), mpi.size());
                mpi.abort(1);
            }
        }
        return result;
    }
    if let Some(n) = vlalign::dist::launched_size().filter(|&n| n > 1) {
        anyhow::bail!(
            "started by an MPI launcher with {n} ranks, but this vlalign was built without MPI: \
             each rank would train alone. Build it with `cargo build --release --features mpi`"
        );
    }
    let device = a.device.resolve()?;
    train(a, vlalign::dist::single(), device)
}

/// One rank of an MPI job: its GPU is the machine's `local`-th from `--device cuda:N`, and GPUs
/// talk through NCCL in a build with it.
#[cfg(feature = "mpi")]
fn on_ranks(a: Args, mpi: &Arc<vlalign::dist::mpi::MpiComm>) -> Result<()> {
    let local = vlalign::dist::launched_local_rank().unwrap_or(0);
    let device = a.device.resolve_for(local)?;
    #[cfg(feature = "nccl")]
    if let candle_core::Device::Cuda(gpu) = &device {
        let nccl = vlalign::dist::nccl::NcclComm::init(mpi, gpu.cuda_stream())?;
        return train(a, Arc::new(nccl), device);
    }
    train(a, mpi.clone(), device)
}

fn train(a: Args, comm: Arc<dyn Comm>, device: candle_core::Device) -> Result<()> {
    let root = comm.rank() == 0;
    let mut cfg = TrainConfig::from_file(&a.config)?;
    if let Some(d) = a.data {
        cfg.data.source = d;
    }
    if let Some(s) = a.steps {
        cfg.set_steps(s).map_err(anyhow::Error::msg)?;
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
        comm,
    };
    let r = Run::new(cfg, &device)?.train(&opts, None)?;
    if !root {
        return Ok(());
    }
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
