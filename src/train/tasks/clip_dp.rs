//! CLIP's contrastive step when the global batch is spread over ranks (open_clip's
//! `gather_with_grad` + `local_loss`, in the form of GradCache, Gao et al. 2021):
//!
//! 1. each rank computes its features (one micro-batch keeps its graph; several are recomputed
//!    in step 3, as single-process accumulation does);
//! 2. the features of every rank are all-gathered, and each rank computes the loss of its own
//!    rows against every column of the global batch ([`loss_rows`]: labels offset by the rows of
//!    the ranks before it), divided by the global batch size, as a function of leaf copies of
//!    its rows and of all the columns; the backward of that small graph gives the gradient of
//!    its rows, of every column, and of the temperature (and SigLIP's bias);
//! 3. the column gradients are reduce-scattered (rank r receives the sum over ranks of the
//!    gradient of its own features used as columns: the backward of an all-gather) and added to
//!    its row gradients; the towers are then backpropagated once with `Σ features ⊙ gradient`.
//!
//! Summed over ranks (the trainer's all-reduce), these are exactly the gradients of the loss
//! over the global batch: each rank's loss part is a partition of its rows, and every path from
//! a feature to the loss is counted once.

use candle_core::{Tensor, Var};

use super::clip::ClipTask;
use crate::data::batch::Batch;
use crate::dist::{self, Comm};
use crate::error::Result;
use crate::objectives::contrastive::loss_rows;
use crate::train::optim::Grads;
use crate::train::task::LossTerms;

impl ClipTask {
    /// This rank's part of the gradient of the contrastive loss over the global batch (the
    /// trainer sums the parts over ranks), and its part of the loss.
    pub(super) fn data_parallel_grads(
        &mut self,
        micro: &[Batch],
        comm: &dyn Comm,
    ) -> Result<(Grads, LossTerms)> {
        let dev = self.parts.device.clone();
        let keep = micro.len() == 1;
        let (mut live, mut imgs, mut txts) = (Vec::new(), Vec::new(), Vec::new());
        for b in micro {
            let (i, t) = self.features(b, true)?;
            imgs.push(i.detach());
            txts.push(t.detach());
            if keep {
                live.push((i, t));
            }
        }
        let (img, txt) = (Tensor::cat(&imgs, 0)?, Tensor::cat(&txts, 0)?);
        let (n_local, d) = img.dims2()?;
        let packed: Vec<f32> = crate::nn::host::flat(&Tensor::cat(&[&img, &txt], 1)?)?;
        let (all, counts) = dist::all_gather_varlen(comm, &packed)?;
        let rows: Vec<usize> = counts.iter().map(|c| c / (2 * d)).collect();
        let n_global: usize = rows.iter().sum();
        let offset: usize = rows[..comm.rank()].iter().sum();
        let all = Tensor::from_vec(all, (n_global, 2 * d), &dev)?.to_dtype(img.dtype())?;
        let cols_img = Var::from_tensor(&all.narrow(1, 0, d)?.contiguous()?)?;
        let cols_txt = Var::from_tensor(&all.narrow(1, d, d)?.contiguous()?)?;
        let rows_img = Var::from_tensor(&img)?;
        let rows_txt = Var::from_tensor(&txt)?;
        let scale = self
            .model
            .logit_scale
            .clone()
            .expect("full CLIP has logit_scale");
        let loss = loss_rows(
            self.loss,
            &rows_img,
            &rows_txt,
            &cols_img,
            &cols_txt,
            offset,
            &scale,
            self.model.logit_bias.as_ref(),
        )?;
        let value = crate::nn::host::f32_of(&loss)?;
        let store = loss.backward()?;
        let mut grads = Grads::new();
        // The temperature (and bias): this rank's part.
        self.parts.collect(&store, &mut grads)?;
        let grad_of = |v: &Var| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        };
        let g_cols: Vec<f32> = crate::nn::host::flat(&Tensor::cat(
            &[grad_of(&cols_img)?, grad_of(&cols_txt)?],
            1,
        )?)?;
        let segments: Vec<usize> = rows.iter().map(|r| r * 2 * d).collect();
        let mine = dist::reduce_scatter_sum(comm, &g_cols, &segments)?;
        let mine = Tensor::from_vec(mine, (n_local, 2 * d), &dev)?.to_dtype(img.dtype())?;
        let g_img = (grad_of(&rows_img)? + mine.narrow(1, 0, d)?)?;
        let g_txt = (grad_of(&rows_txt)? + mine.narrow(1, d, d)?)?;
        let mut at = 0;
        for (j, b) in micro.iter().enumerate() {
            let n = b.len();
            let (i, t) = match keep {
                true => live[j].clone(),
                false => self.features(b, false)?,
            };
            let surrogate = ((i * g_img.narrow(0, at, n)?)?.sum_all()?
                + (t * g_txt.narrow(0, at, n)?)?.sum_all()?)?;
            self.parts.collect(&surrogate.backward()?, &mut grads)?;
            at += n;
        }
        Ok((
            grads,
            LossTerms {
                total: value,
                parts: vec![("contrastive".into(), value)],
            },
        ))
    }
}
