//! Training checkpoints (DESIGN.md §3): `RUN/checkpoints/step-N/` holds a model directory plus
//! `optimizer.safetensors` and `trainer_state.json`; `RUN/last` names the newest complete one.
//! Each checkpoint is written into a temporary sibling and renamed into place, and `last` is
//! replaced by rename after that, so a kill at any point leaves the previous checkpoint usable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::task::Task;
use crate::error::{Error, Result};
use crate::io::{write_dir_atomic, write_json};

/// The task's own state in a checkpoint ([`Task::state`]), when it has any.
pub const TASK_STATE: &str = "task_state.safetensors";

/// `trainer_state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    /// The run's seed: with the step and the data position it fixes every later random choice.
    pub seed: u64,
    /// Samples consumed from the data stream (the loader resumes here).
    pub data_position: u64,
    pub samples_seen: u64,
    pub skipped_samples: u64,
    pub wall_seconds: f64,
    /// The run's config (TOML).
    pub config: String,
    /// The last logged metrics.
    pub metrics: serde_json::Value,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Writes checkpoint `state.step`, points `last` at it and keeps the newest `keep`.
pub fn save(
    run: &Path,
    task: &dyn Task,
    opt: &AdamW,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let name = format!("step-{:07}", state.step);
    let target = checkpoints_dir(run).join(&name);
    write_dir_atomic(&target, |tmp| {
        task.write_model(tmp)?;
        let p = tmp.join("optimizer.safetensors");
        candle_core::safetensors::save(&opt.state()?, &p)
            .map_err(|e| Error::weights(&p, e.to_string()))?;
        let extra = task.state()?;
        if !extra.is_empty() {
            let p = tmp.join(TASK_STATE);
            candle_core::safetensors::save(&extra, &p)
                .map_err(|e| Error::weights(&p, e.to_string()))?;
        }
        write_json(
            &tmp.join("trainer_state.json"),
            &serde_json::to_value(state).expect("state serialises"),
        )
    })?;
    let last = run.join("last");
    let tmp = run.join(".last.tmp");
    std::fs::write(&tmp, format!("checkpoints/{name}\n")).map_err(|e| Error::io(&tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &last).map_err(|e| Error::io(&last, e))?;
    prune(run, keep.max(1), &target)?;
    Ok(target)
}

/// Removes all but the newest `keep` checkpoints (never `current`), and leftovers of
/// interrupted writes.
fn prune(run: &Path, keep: usize, current: &Path) -> Result<()> {
    let dir = checkpoints_dir(run);
    let mut steps = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let p = e.map_err(|e| Error::io(&dir, e))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(".step-") && name.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(&p);
        } else if name.starts_with("step-") {
            steps.push(p);
        }
    }
    steps.sort();
    let n = steps.len();
    for p in steps.into_iter().take(n.saturating_sub(keep)) {
        if p != current {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// The checkpoint `RUN/last` points to, if any.
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    let last = run.join("last");
    if !last.is_file() {
        return Ok(None);
    }
    let rel = crate::io::read_to_string(&last)?;
    let dir = run.join(rel.trim());
    if !dir.join("trainer_state.json").is_file() {
        return Err(Error::input(format!(
            "{} points to {}, which is not a complete checkpoint",
            last.display(),
            dir.display()
        )));
    }
    Ok(Some(dir))
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    crate::io::read_json(dir.join("trainer_state.json"))
}
