//! The training loop, shared by every [`Task`]: the whole step is visible in [`run`] (as in
//! big_vision's trainers) — batches, gradients, the finite-loss check, clipping, AdamW at the
//! scheduled rate, the task's post-step hook, logging, checkpoints, periodic evaluation.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use serde_json::json;

use super::checkpoint::{self, TrainerState};
use super::config::TrainConfig;
use super::data_parallel::{self as dp, StartCounters};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::task::Task;
use crate::data::batch::Batch;
use crate::data::loader::Loader;
use crate::dist::Comm;
use crate::error::{Error, Result};

/// Samples a stream of unknown length (tar shards) may yield with no usable batch before the
/// run stops with an error.
const BARREN_STREAM: u64 = 10_000;

pub struct RunOptions {
    pub run_dir: PathBuf,
    /// Continue from `RUN/last` (a fresh start when there is none).
    pub resume: bool,
    /// Draw a progress bar (when stderr is a terminal) or print progress lines.
    pub progress: bool,
    /// The ranks of a data-parallel run ([`crate::dist::single`] for one process): each takes
    /// its part of every global batch (`train.batch_size`) and the gradients are summed.
    pub comm: Arc<dyn Comm>,
}

/// Named metric values, for metrics.jsonl and the plots.
pub type Metrics = Vec<(String, f64)>;
/// A periodic evaluation of the task being trained.
pub type EvalFn<'a, T> = Box<dyn FnMut(&T) -> Result<Metrics> + 'a>;

/// Evaluation every `every` steps.
pub struct EvalHook<'a, T> {
    pub every: u64,
    pub run: EvalFn<'a, T>,
}

#[derive(Clone, Debug)]
pub struct RunReport {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub last_loss: f32,
    pub wall_seconds: f64,
    pub samples_per_second: f64,
    pub skipped_samples: u64,
    /// `RUN/model`, the final model directory.
    pub model_dir: PathBuf,
}

/// Keys whose change does not break a resumed run.
fn comparable(cfg: &TrainConfig) -> TrainConfig {
    let mut c = cfg.clone();
    c.train.steps = 0;
    c.train.log_every = 0;
    c.train.checkpoint_every = 0;
    c.train.keep_checkpoints = 0;
    c.data.workers = 0;
    c.data.prefetch = 0;
    c
}

/// Takes the run directory's lock for this process: an OS file lock on `RUN/.lock`, released
/// when the returned file closes (also when the process is killed), so two runs can never write
/// one directory at once.
fn lock_run_dir(run: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
    let path = run.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::input(format!(
            "{} is in use by another vlalign run; wait for it or choose another --out",
            run.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

fn prepare_run_dir(cfg: &TrainConfig, opts: &RunOptions) -> Result<Option<PathBuf>> {
    let run = &opts.run_dir;
    let cfg_path = run.join("config.toml");
    let last = checkpoint::latest(run)?;
    if !opts.resume && (last.is_some() || run.join("last").exists()) {
        return Err(Error::input(format!(
            "{} already holds a run; pass --resume to continue it, or choose another --out",
            run.display()
        )));
    }
    if opts.resume && cfg_path.is_file() {
        let before = TrainConfig::from_file(&cfg_path)?;
        if comparable(&before) != comparable(cfg) {
            return Err(Error::config(
                &cfg_path,
                "the run was started with a different config; resume with the same one (only \
                 train.steps, log_every, checkpoint_every, keep_checkpoints and data.workers/prefetch may change)",
            ));
        }
    }
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(|e| Error::io(&cfg_path, e))?;
    Ok(if opts.resume { last } else { None })
}

/// Keeps the metrics of steps up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = crate::io::read_to_string(path)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| Error::io(path, e))
}

/// Refuses to save weights that are NaN or infinite: `last` only ever points at a finite
/// checkpoint, and no model directory holds a diverged model.
fn ensure_weights_finite(task: &dyn Task, step: u64) -> Result<()> {
    let vars = task.vars();
    let tensors: Vec<&Tensor> = vars.iter().map(|(_, v)| v.as_tensor()).collect();
    crate::nn::ops::ensure_each_finite(&tensors, |i| {
        format!("weights `{}` after step {step}", vars[i].0)
    })
    .map_err(|e| {
        Error::NonFinite(format!(
            "{e}; stopping: nothing from this step is saved (the last checkpoint is intact). \
             Lower train.lr or raise warmup_steps."
        ))
    })
}

pub fn run<T: Task>(
    task: &mut T,
    cfg: &TrainConfig,
    opts: &RunOptions,
    make_loader: impl FnOnce(u64) -> Result<Loader>,
    mut eval: Option<EvalHook<T>>,
) -> Result<RunReport> {
    let t = &cfg.train;
    let comm = opts.comm.clone();
    let root = comm.rank() == 0;
    if comm.size() > 1 {
        task.data_parallel()?;
    }
    task.parts_mut().comm = comm.clone();
    // Rank 0 alone owns the run directory; the others take its state below.
    let _lock = root.then(|| lock_run_dir(&opts.run_dir)).transpose()?;
    let resume_from = match root {
        true => prepare_run_dir(cfg, opts)?,
        false => None,
    };
    let mut opt = AdamW::new(task.vars(), AdamWConfig::of(t))?;
    let mut step = 0u64;
    let mut position = 0u64;
    let (mut samples, mut skipped, mut wall_before) = (0u64, 0u64, 0f64);
    let metrics_path = opts.run_dir.join("metrics.jsonl");
    let mut resumed_from = None;
    if !root {
        // Counters, weights and optimiser state come from rank 0 (below).
    } else if let Some(ck) = &resume_from {
        let state = checkpoint::load_state(ck)?;
        task.load_weights(ck)?;
        let p = ck.join("optimizer.safetensors");
        let st = candle_core::safetensors::load(&p, &task.parts().device)
            .map_err(|e| Error::weights(&p, e.to_string()))?;
        opt.load_state(&st)
            .map_err(|e| Error::weights(&p, e.to_string()))?;
        let p = ck.join(checkpoint::TASK_STATE);
        let extra = if p.is_file() {
            candle_core::safetensors::load(&p, &task.parts().device)
                .map_err(|e| Error::weights(&p, e.to_string()))?
        } else {
            Default::default()
        };
        task.load_state(&extra, &ck.display().to_string())?;
        (step, position, samples, skipped, wall_before) = (
            state.step,
            state.data_position,
            state.samples_seen,
            state.skipped_samples,
            state.wall_seconds,
        );
        resumed_from = Some(step);
        truncate_metrics(&metrics_path, step)?;
        eprintln!(
            "resuming {} at step {step} from {}",
            opts.run_dir.display(),
            ck.display()
        );
    } else if !opts.resume || !metrics_path.exists() {
        let _ = std::fs::remove_file(&metrics_path);
    } else {
        truncate_metrics(&metrics_path, 0)?;
    }
    let mut counters = StartCounters {
        step,
        position,
        samples,
        skipped,
        wall_before,
        resumed: resumed_from.is_some(),
        ..Default::default()
    };
    // The trained variables (fixed for the run): what the ranks share and sum.
    let vars = task.vars();
    dp::share_start(comm.as_ref(), &vars, &mut opt, &mut counters)?;
    (step, position, samples, skipped, wall_before) = (
        counters.step,
        counters.position,
        counters.samples,
        counters.skipped,
        counters.wall_before,
    );
    resumed_from = counters.resumed.then_some(step);
    let mut metrics: Box<dyn Write> = match root {
        true => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| Error::io(&metrics_path, e))?,
        ),
        false => Box::new(std::io::sink()),
    };
    let schedule = Schedule {
        base_lr: t.lr,
        min_lr: t.min_lr,
        warmup_steps: t.warmup_steps,
        total_steps: t.steps,
    };
    let mut loader = make_loader(position)?;
    // Samples read with no usable batch before giving up: an epoch when the source knows its
    // length, else a bound that any real stream passes.
    let barren_limit = loader.epoch_len().unwrap_or(BARREN_STREAM).max(1);
    let (mut barren, mut last_skip, mut warned_ratio) = (0u64, String::new(), false);
    let start_position = position;
    let progress = opts.progress && root;
    let bar = (progress && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(t.steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_position(step);
        pb
    });
    let started = Instant::now();
    let start_samples = samples;
    let mut last_loss = f32::NAN;
    let mut last_metrics = json!({});
    let mut warned = 0usize;
    // Host reads made by the steps since the last metrics line (nn::host), and those steps.
    let (mut step_reads, mut read_steps) = (0u64, 0u64);
    let mut scalars = Vec::new();
    while step < t.steps {
        // Gather the accumulation micro-batches, skipping what the loader could not read.
        let mut micro: Vec<Batch> = Vec::with_capacity(t.accum_steps);
        let mut step_samples = 0u64;
        while micro.len() < t.accum_steps {
            let before = position;
            let b = loader.next_batch()?;
            position = b.position;
            // Every rank holds a part of the global batch: they decide together.
            let counts = dp::batch_counts(comm.as_ref(), b.len(), b.skipped.len())?;
            skipped += counts.skipped;
            for why in &b.skipped {
                if warned < 10 {
                    tracing::warn!("skipped sample: {why}");
                    warned += 1;
                }
            }
            if let Some(why) = b.skipped.last() {
                last_skip = why.clone();
            }
            // A contrastive batch needs two samples, and every rank at least one.
            if counts.usable >= 2 && counts.fewest >= 1 {
                barren = 0;
                step_samples += counts.usable;
                micro.push(b);
            } else {
                skipped += counts.usable;
                // A source with no usable sample would otherwise be read forever.
                barren += position.saturating_sub(before);
                if barren >= barren_limit {
                    // Manifests know their length; a missing image there is most often a path
                    // relative to the wrong folder.
                    let hint = if loader.epoch_len().is_some() {
                        "; are the image paths relative to the manifest's folder?"
                    } else {
                        ""
                    };
                    return Err(Error::input(format!(
                        "no usable sample in the last {barren} samples of the data (a whole \
                         epoch or more; {skipped} skipped in all), e.g. {last_skip}{hint}"
                    )));
                }
            }
            let consumed = position.saturating_sub(start_position);
            if root && !warned_ratio && consumed >= barren_limit.min(1000) && skipped * 2 > consumed
            {
                warned_ratio = true;
                tracing::warn!(
                    "{skipped} of the first {consumed} samples were skipped (unreadable or \
                     corrupt): most of the data is unusable"
                );
                eprintln!(
                    "warning: {skipped} of the first {consumed} samples were skipped; most of \
                     the data is unusable"
                );
            }
        }
        let reads_before = crate::nn::host::reads();
        let (mut grads, mut terms) = task.grads(&micro, step)?;
        dp::sum_step(comm.as_ref(), &vars, &mut grads, &mut terms)?;
        if !terms.total.is_finite() {
            return Err(Error::input(format!(
                "non-finite loss ({}) at step {}; stopping: nothing from this step is saved \
                 (the last checkpoint is intact). Lower train.lr or raise warmup_steps.",
                terms.total,
                step + 1
            )));
        }
        if step < t.freeze_steps {
            grads.retain(|name, _| {
                !t.freeze_prefixes
                    .iter()
                    .any(|p| name.starts_with(p.as_str()))
            });
        }
        // The clipped norm stays on the device until it is logged (no host read per step).
        let grad_norm = if t.grad_clip > 0.0 {
            clip_grad_norm(&mut grads, t.grad_clip)?
        } else {
            None
        };
        let lr = schedule.lr(step);
        opt.step(&grads, lr)?;
        task.after_step()?;
        step_reads += crate::nn::host::reads() - reads_before;
        read_steps += 1;
        step += 1;
        samples += step_samples;
        last_loss = terms.total;
        let elapsed = started.elapsed().as_secs_f64();
        let rate = (samples - start_samples) as f64 / elapsed.max(1e-9);
        let log = step.is_multiple_of(t.log_every) || step == t.steps;
        if log || scalars.is_empty() {
            // Read (from the device) only for a metrics line and the first bar message.
            scalars = task.scalars();
        }
        if let Some(pb) = &bar {
            let extra: String = scalars
                .iter()
                .map(|(k, v)| format!(" {k} {v:.2}"))
                .collect();
            pb.set_position(step);
            pb.set_message(format!(
                "loss {last_loss:.4} lr {lr:.2e}{extra} {rate:.0} samples/s"
            ));
        }
        if log {
            let grad_norm = match &grad_norm {
                Some(n) => crate::nn::host::f64_of(n)?,
                None => f64::NAN,
            };
            let mut m = json!({
                "step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                "samples_per_s": rate, "samples": samples, "skipped": skipped,
                "host_reads_per_step": step_reads as f64 / read_steps.max(1) as f64,
            });
            (step_reads, read_steps) = (0, 0);
            for (k, v) in terms.parts.iter().chain(&scalars) {
                m[k] = json!(v);
            }
            writeln!(metrics, "{m}").map_err(|e| Error::io(&metrics_path, e))?;
            if progress && bar.is_none() {
                eprintln!(
                    "step {step}/{} loss {last_loss:.4} lr {lr:.2e} {rate:.0} samples/s",
                    t.steps
                );
            }
            last_metrics = m;
        }
        if let Some(hook) = eval.as_mut().filter(|_| root) {
            if step.is_multiple_of(hook.every) || step == t.steps {
                let results = (hook.run)(&*task)?;
                let mut m = json!({"step": step});
                for (k, v) in &results {
                    m[format!("eval/{k}")] = json!(v);
                }
                writeln!(metrics, "{m}").map_err(|e| Error::io(&metrics_path, e))?;
                if let Some(pb) = &bar {
                    let txt: Vec<String> =
                        results.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
                    pb.println(format!("step {step}: {}", txt.join(", ")));
                }
            }
        }
        if step.is_multiple_of(t.checkpoint_every) || step == t.steps {
            let state = TrainerState {
                step,
                seed: t.seed,
                data_position: position,
                samples_seen: samples,
                skipped_samples: skipped,
                wall_seconds: wall_before + elapsed,
                config: cfg.to_toml(),
                metrics: last_metrics.clone(),
            };
            ensure_weights_finite(&*task, step)?;
            if root {
                checkpoint::save(&opts.run_dir, &*task, &opt, &state, t.keep_checkpoints)?;
            }
        }
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    ensure_weights_finite(&*task, step)?;
    let model_dir = opts.run_dir.join("model");
    if root {
        crate::io::write_dir_atomic(&model_dir, |tmp| task.write_model(tmp))?;
        plot_metrics(&opts.run_dir, task.loss_names())?;
    }
    if skipped > 0 && root {
        eprintln!("{skipped} samples were skipped (unreadable or corrupt); see warnings above");
    }
    let wall = started.elapsed().as_secs_f64();
    Ok(RunReport {
        steps: step,
        resumed_from,
        last_loss,
        wall_seconds: wall_before + wall,
        samples_per_second: (samples - start_samples) as f64 / wall.max(1e-9),
        skipped_samples: skipped,
        model_dir,
    })
}

/// `loss.png` (the loss and its terms `loss_names`), `metrics.png` (evaluations) and
/// `logit_scale.png`, from `metrics.jsonl`.
pub fn plot_metrics(run: &Path, loss_names: &[&str]) -> Result<()> {
    let path = run.join("metrics.jsonl");
    let text = crate::io::read_to_string(&path)?;
    let mut series: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(obj) = v.as_object() {
            for (k, x) in obj {
                if let Some(x) = x.as_f64() {
                    series.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    let pick = |f: &dyn Fn(&str) -> bool| -> Vec<(String, Vec<(f64, f64)>)> {
        series
            .iter()
            .filter(|(k, _)| f(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let loss = pick(&|k| k == "loss" || loss_names.contains(&k));
    super::plot::line_chart(&run.join("loss.png"), "training loss", "step", &loss)?;
    let evals = pick(&|k| k.starts_with("eval/"));
    if !evals.is_empty() {
        super::plot::line_chart(&run.join("metrics.png"), "evaluation", "step", &evals)?;
    }
    let other = pick(&|k| k == "logit_scale");
    if !other.is_empty() {
        super::plot::line_chart(
            &run.join("logit_scale.png"),
            "exp(logit scale)",
            "step",
            &other,
        )?;
    }
    Ok(())
}
