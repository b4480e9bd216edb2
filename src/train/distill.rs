//! The training state of momentum distillation (ALBEF, Li et al. 2021, §3.3;
//! `models/model_pretrain.py` `copy_params`, `_momentum_update`, `_dequeue_and_enqueue`): the
//! momentum copy of the trained variables and the queues of its features. The loss itself is
//! `objectives::distill`.
//!
//! - The copy starts equal to the model and, after every optimiser step, moves by
//!   `m ← μ·m + (1 − μ)·p`. ALBEF updates at the start of each forward pass instead; with the
//!   copy starting equal, the two orders give the same momentum weights at every forward.
//! - The queues start as ALBEF's: standard-normal rows, L2-normalised (seeded here), with image
//!   ids that match nothing (BLIP's −100). Each step writes the batch's momentum features at the
//!   cursor, wrapping around.
//! - [`Distillation::state`] is what a checkpoint keeps of it: a resumed run is bit-identical.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;

use super::config::DistillSpec;
use crate::error::{Error, Result};
use crate::nn::ops::l2_normalize;

/// Queues of momentum features: `[Q, …]` per tower (an entry is a `[D]` feature, or for the
/// Q-Former's image side `[queries, D]`) and the image id of each entry.
pub struct FeatureQueues {
    pub image: Tensor,
    pub text: Tensor,
    /// `None` for a slot not written yet.
    pub ids: Vec<Option<u64>>,
    /// The next row to write.
    pub cursor: usize,
}

impl FeatureQueues {
    /// `size` random entries per tower, of shape `image_entry` and `[text_dim]`: standard
    /// normal, every feature vector (the last dimension) L2-normalised (ALBEF's `randn` +
    /// `normalize`), drawn from `seed`.
    pub fn new(
        size: usize,
        image_entry: &[usize],
        text_dim: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let rows = |name: &str, entry: &[usize]| -> Result<Tensor> {
            let init = candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            };
            let dims: Vec<usize> = std::iter::once(size).chain(entry.iter().copied()).collect();
            let shape = candle_core::Shape::from(dims);
            let v = crate::nn::init::seeded_values(&init, &shape, seed, name);
            let t = Tensor::from_vec(v, shape, device)?;
            Ok(if size == 0 { t } else { l2_normalize(&t)? })
        };
        Ok(Self {
            image: rows("distill.image_queue", image_entry)?,
            text: rows("distill.text_queue", &[text_dim])?,
            ids: vec![None; size],
            cursor: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// `[batch; queue]`: the columns a batch's features are compared with.
    pub fn columns(batch: &Tensor, queue: &Tensor) -> Result<Tensor> {
        Ok(if queue.dim(0)? == 0 {
            batch.clone()
        } else {
            Tensor::cat(&[batch, queue], 0)?
        })
    }

    /// ALBEF's `_dequeue_and_enqueue`: the rows of `image`, `text` (`[n, D]`) and their ids
    /// replace the oldest entries, from the cursor on, wrapping around.
    pub fn push(&mut self, image: &Tensor, text: &Tensor, ids: &[u64]) -> Result<()> {
        let q = self.len();
        if q == 0 {
            return Ok(());
        }
        let write = |queue: &Tensor, rows: &Tensor, cursor: usize| -> Result<Tensor> {
            let n = rows.dim(0)?;
            let d = queue.elem_count() / q;
            if rows.elem_count() != n * d {
                return Err(Error::input(format!(
                    "queue entries are {:?}, features {:?}",
                    &queue.dims()[1..],
                    &rows.dims()[1..]
                )));
            }
            // On the device, in at most a few contiguous pieces (no host round trip per step):
            // row r lands in slot (cursor + r) mod q, a later row overwriting an earlier one.
            let mut shape = queue.dims().to_vec();
            shape[0] = n;
            let rows = rows.to_dtype(queue.dtype())?.reshape(shape)?;
            let (mut out, mut r, mut slot) = (queue.clone(), 0, cursor);
            while r < n {
                let piece = (q - slot).min(n - r);
                out = out.slice_scatter0(&rows.narrow(0, r, piece)?, slot)?;
                r += piece;
                slot = (slot + piece) % q;
            }
            Ok(out)
        };
        self.image = write(&self.image, &image.detach(), self.cursor)?;
        self.text = write(&self.text, &text.detach(), self.cursor)?;
        for (r, &id) in ids.iter().enumerate() {
            self.ids[(self.cursor + r) % q] = Some(id);
        }
        self.cursor = (self.cursor + ids.len()) % q;
        Ok(())
    }
}

/// Why a distilling task refuses to train on several ranks (`Task::data_parallel`).
pub fn not_data_parallel() -> Error {
    Error::input(
        "momentum distillation does not train data-parallel yet (its feature queues would need \
         the global batch); run it as one process",
    )
}

/// The momentum copy and the queues of one distilled run.
pub struct Distillation {
    pub spec: DistillSpec,
    /// The momentum variables, named as the trained ones; the optimiser never sees them. A
    /// model built over this map is the momentum model.
    pub varmap: VarMap,
    /// (name, trained variable, momentum variable).
    pairs: Vec<(String, Var, Var)>,
    pub queues: FeatureQueues,
}

impl Distillation {
    /// A momentum copy of `online` (equal to it, as ALBEF's `copy_params`) and queues of
    /// `spec.queue_size` random entries ([`FeatureQueues::new`]).
    pub fn new(
        spec: &DistillSpec,
        online: &[(String, Var)],
        image_entry: &[usize],
        text_dim: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let mut pairs = Vec::with_capacity(online.len());
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, v) in online {
                let m = Var::from_tensor(&v.as_tensor().detach().copy()?)?;
                data.insert(name.clone(), m.clone());
                pairs.push((name.clone(), v.clone(), m));
            }
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            spec: spec.clone(),
            varmap,
            pairs,
            queues: FeatureQueues::new(spec.queue_size, image_entry, text_dim, seed, device)?,
        })
    }

    /// ALBEF's `_momentum_update`: `m ← μ·m + (1 − μ)·p` for every variable.
    pub fn update(&self) -> Result<()> {
        let mu = self.spec.momentum;
        for (_, p, m) in &self.pairs {
            let next = ((m.as_tensor() * mu)? + (p.as_tensor().detach() * (1.0 - mu))?)?;
            m.set(&next)?;
        }
        Ok(())
    }

    /// The distillation weight at `step` (ALBEF's ramp).
    pub fn alpha(&self, step: u64) -> f64 {
        crate::objectives::distill::alpha_at(self.spec.alpha, self.spec.alpha_warmup_steps, step)
    }

    /// The state a checkpoint keeps: `momentum.{name}` per variable, the queues, their ids
    /// (bits as i64, with `queue.filled` 0/1 per slot) and the cursor.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, _, m) in &self.pairs {
            out.insert(format!("momentum.{name}"), m.as_tensor().detach().copy()?);
        }
        let q = &self.queues;
        let dev = q.image.device();
        out.insert("queue.image".into(), q.image.clone());
        out.insert("queue.text".into(), q.text.clone());
        let ids: Vec<i64> = q.ids.iter().map(|i| i.unwrap_or(0) as i64).collect();
        let filled: Vec<u8> = q.ids.iter().map(|i| i.is_some() as u8).collect();
        out.insert("queue.ids".into(), Tensor::new(ids, dev)?);
        out.insert("queue.filled".into(), Tensor::new(filled, dev)?);
        out.insert("queue.cursor".into(), Tensor::new(&[q.cursor as i64], dev)?);
        Ok(out)
    }

    /// Restores what [`Distillation::state`] saved; every tensor must be there with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, from: &str) -> Result<()> {
        let get = |k: &str| {
            state.get(k).ok_or_else(|| {
                Error::input(format!(
                    "{from}: no `{k}` (the run distils; its checkpoint must hold the momentum state)"
                ))
            })
        };
        let shaped = |k: &str, like: &Tensor| -> Result<Tensor> {
            let t = get(k)?;
            if t.dims() != like.dims() {
                return Err(Error::input(format!(
                    "{from}: `{k}` has shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.to_dtype(like.dtype())?.copy()?)
        };
        for (name, _, m) in &self.pairs {
            m.set(&shaped(&format!("momentum.{name}"), m.as_tensor())?)?;
        }
        let q = &mut self.queues;
        q.image = shaped("queue.image", &q.image)?;
        q.text = shaped("queue.text", &q.text)?;
        let n = q.ids.len();
        let ids: Vec<i64> = crate::nn::host::flat(get("queue.ids")?)?;
        let filled: Vec<u8> = crate::nn::host::flat(get("queue.filled")?)?;
        let cursor: Vec<i64> = crate::nn::host::flat(get("queue.cursor")?)?;
        match cursor.as_slice() {
            [c] if ids.len() == n && filled.len() == n && (*c as usize) < n.max(1) && *c >= 0 => {
                q.cursor = *c as usize;
            }
            _ => {
                return Err(Error::input(format!(
                    "{from}: queue ids/filled/cursor do not fit a queue of {n}"
                )))
            }
        }
        q.ids = ids
            .iter()
            .zip(&filled)
            .map(|(&i, &f)| (f != 0).then_some(i as u64))
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, IndexOp};

    fn spec(q: usize) -> DistillSpec {
        DistillSpec {
            momentum: 0.9,
            alpha: 0.4,
            alpha_warmup_steps: 0,
            queue_size: q,
            same_image_targets: true,
        }
    }

    /// The queue starts with unit rows, writes at the cursor and wraps.
    #[test]
    fn queues_start_normalised_and_wrap() {
        let dev = Device::Cpu;
        let mut q = FeatureQueues::new(4, &[3], 3, 0, &dev).unwrap();
        let norms: Vec<f32> = q.image.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
        let rows = |v: f32| Tensor::full(v, (3, 3), &dev).unwrap();
        q.push(&rows(1.0), &rows(2.0), &[1, 2, 3]).unwrap();
        q.push(&rows(5.0), &rows(6.0), &[4, 5, 6]).unwrap();
        assert_eq!(q.cursor, 2);
        assert_eq!(q.ids, vec![Some(5), Some(6), Some(3), Some(4)]);
        let img: Vec<Vec<f32>> = q.image.to_vec2().unwrap();
        assert_eq!(img[0], vec![5.0; 3]);
        assert_eq!(img[2], vec![1.0; 3]);
        assert_eq!(img[3], vec![5.0; 3]);
        // Five rows into a queue of 4 from slot 2: slots 2, 3, 0, 1, 2 — the fifth row (40)
        // overwrites the first (0) in slot 2, and the cursor ends at 3.
        let ramp = |k: f32| {
            Tensor::arange(0f32, 5.0, &dev)
                .unwrap()
                .affine(10.0 * k as f64, 0.0)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .repeat((1, 3))
                .unwrap()
        };
        q.push(&ramp(1.0), &ramp(2.0), &[7, 8, 9, 10, 11]).unwrap();
        assert_eq!(q.cursor, 3);
        assert_eq!(q.ids, vec![Some(9), Some(10), Some(11), Some(8)]);
        let col = |t: &Tensor| -> Vec<f32> { t.i((.., 0)).unwrap().to_vec1().unwrap() };
        assert_eq!(col(&q.image), [20.0, 30.0, 40.0, 10.0]);
        assert_eq!(col(&q.text), [40.0, 60.0, 80.0, 20.0]);
    }

    /// m ← 0.9 m + 0.1 p, and the state round-trips.
    #[test]
    fn momentum_moves_towards_the_model_and_round_trips() {
        let dev = Device::Cpu;
        let p = Var::new(&[1f32, 2.0], &dev).unwrap();
        let d = Distillation::new(&spec(2), &[("w".into(), p.clone())], &[2], 2, 0, &dev).unwrap();
        p.set(&Tensor::new(&[11f32, 2.0], &dev).unwrap()).unwrap();
        d.update().unwrap();
        let m: Vec<f32> = d.state().unwrap()["momentum.w"].to_vec1().unwrap();
        assert!(
            (m[0] - 2.0).abs() < 1e-6 && (m[1] - 2.0).abs() < 1e-6,
            "{m:?}"
        );
        let mut d2 =
            Distillation::new(&spec(2), &[("w".into(), p.clone())], &[2], 2, 1, &dev).unwrap();
        let mut d = d;
        d.queues
            .push(
                &Tensor::ones((1, 2), DType::F32, &dev).unwrap(),
                &Tensor::ones((1, 2), DType::F32, &dev).unwrap(),
                &[9],
            )
            .unwrap();
        d2.load_state(&d.state().unwrap(), "test").unwrap();
        assert_eq!(d2.queues.ids, vec![Some(9), None]);
        assert_eq!(d2.queues.cursor, 1);
        let a: Vec<Vec<f32>> = d.queues.text.to_vec2().unwrap();
        let b: Vec<Vec<f32>> = d2.queues.text.to_vec2().unwrap();
        assert_eq!(a, b);
        let mut missing = d.state().unwrap();
        missing.remove("queue.cursor");
        assert!(d2
            .load_state(&missing, "ck")
            .unwrap_err()
            .to_string()
            .contains("queue.cursor"));
    }
}
