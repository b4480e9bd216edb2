//! What the trainer adds when a run has several ranks ([`crate::dist::Comm`]): every rank
//! starts from rank 0's state, agrees on which batches are usable, and applies the same summed
//! gradient, so that the ranks stay identical and the run equals one process with the global
//! batch (up to the order of float additions).
//!
//! Rank 0 alone touches the run directory (lock, config, metrics, checkpoints, model); the
//! others take the weights, the optimiser state and the counters from it at the start — also on
//! `--resume`, so a run resumes with any number of ranks (the data position counts global
//! samples, and the optimiser state is the same on every rank).

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, Grads};
use super::task::LossTerms;
use crate::dist::{self, Comm};
use crate::error::{Error, Result};

/// The trainer's counters at the start of a run, shared from rank 0.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StartCounters {
    pub step: u64,
    pub position: u64,
    pub samples: u64,
    pub skipped: u64,
    pub wall_before: f64,
    pub resumed: bool,
    /// AdamW's step count (its bias corrections), filled in by [`share_start`].
    pub optimizer_steps: u64,
}

/// Copies rank 0's trainable variables, optimiser state and counters to every rank.
pub fn share_start(
    comm: &dyn Comm,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    counters: &mut StartCounters,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let root = comm.rank() == 0;
    counters.optimizer_steps = opt.steps_taken();
    let mut json = if root {
        serde_json::to_vec(counters).map_err(|e| Error::input(e.to_string()))?
    } else {
        Vec::new()
    };
    dist::broadcast_bytes(comm, &mut json, 0)?;
    *counters = serde_json::from_slice(&json)
        .map_err(|e| Error::input(format!("counters from rank 0: {e}")))?;
    for (_, var) in by_name(vars) {
        let t = broadcast_tensor(comm, var.as_tensor())?;
        if !root {
            var.set(&t)?;
        }
    }
    let mut state = opt.state()?;
    let mut keys: Vec<String> = state.keys().filter(|k| *k != "step").cloned().collect();
    keys.sort();
    for k in keys {
        let t = broadcast_tensor(comm, &state[&k])?;
        state.insert(k, t);
    }
    if !root {
        // The step count came exactly with the counters (an f32 would round it).
        let step = Tensor::new(counters.optimizer_steps as f64, state["step"].device())?;
        state.insert("step".into(), step);
        opt.load_state(&state)?;
    }
    Ok(())
}

/// The variables in name order: the order every rank sends them in.
fn by_name(vars: &[(String, Var)]) -> Vec<&(String, Var)> {
    let mut sorted: Vec<&(String, Var)> = vars.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
}

/// Rank 0's values of `t` (same shape everywhere), in `t`'s dtype.
fn broadcast_tensor(comm: &dyn Comm, t: &Tensor) -> Result<Tensor> {
    let mut v: Vec<f32> = crate::nn::host::flat(t)?;
    comm.broadcast_f32(&mut v, 0)?;
    Ok(Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

/// A loader batch seen from every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchCounts {
    /// Usable samples over all ranks.
    pub usable: u64,
    /// The fewest usable samples any rank holds.
    pub fewest: u64,
    /// Samples skipped (unreadable) over all ranks.
    pub skipped: u64,
}

/// Every rank's usable and skipped sample counts of its part of one global batch.
pub fn batch_counts(comm: &dyn Comm, usable: usize, skipped: usize) -> Result<BatchCounts> {
    let all = dist::all_gather_u64s(comm, &[usable as u64, skipped as u64])?;
    let usable = all.iter().step_by(2);
    Ok(BatchCounts {
        usable: usable.clone().sum(),
        fewest: usable.min().copied().unwrap_or(0),
        skipped: all.iter().skip(1).step_by(2).sum(),
    })
}

/// Sums the ranks' gradient parts and loss terms in one all-reduce (variables in name order,
/// a flag per variable saying whether any rank has its gradient), so that every rank then holds
/// the same global gradient.
pub fn sum_step(
    comm: &dyn Comm,
    vars: &[(String, Var)],
    grads: &mut Grads,
    terms: &mut LossTerms,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let sorted = by_name(vars);
    // Packed on the device and read in one go (one host read per step, not one per variable).
    let mut parts = Vec::with_capacity(sorted.len());
    let mut flags = Vec::with_capacity(sorted.len());
    for (name, var) in &sorted {
        match grads.get(name) {
            Some(g) => {
                parts.push(g.to_dtype(DType::F32)?.flatten_all()?);
                flags.push(1.0);
            }
            None => {
                parts.push(Tensor::zeros(var.elem_count(), DType::F32, var.device())?);
                flags.push(0.0);
            }
        }
    }
    let mut buf: Vec<f32> = if parts.is_empty() {
        Vec::new()
    } else {
        crate::nn::host::flat(&Tensor::cat(&parts, 0)?)?
    };
    let n_grads = buf.len();
    buf.extend(flags);
    buf.push(terms.total);
    buf.extend(terms.parts.iter().map(|p| p.1));
    dist::all_reduce_sum(comm, &mut buf)?;
    let mut at = 0;
    for (k, (name, var)) in sorted.iter().enumerate() {
        let n = var.elem_count();
        if buf[n_grads + k] > 0.0 {
            let g = Tensor::from_slice(&buf[at..at + n], var.shape(), var.device())?
                .to_dtype(var.dtype())?;
            grads.insert(name.clone(), g);
        }
        at += n;
    }
    let rest = &buf[n_grads + sorted.len()..];
    terms.total = rest[0];
    for (p, v) in terms.parts.iter_mut().zip(&rest[1..]) {
        p.1 = *v;
    }
    Ok(())
}
