//! The whole batch of a data-parallel Q-Former step, as every rank holds it after one exchange
//! per micro-batch (LAVIS `blip2_qformer.py` gathers the same under DDP: the ITC features for
//! ITC over the global batch, the image embeddings and texts so that hard negatives come from
//! any rank). The order is the one a single process holds: micro-batch by micro-batch, and
//! within each the ranks' parts in rank order, so that the seeded hard-negative draw over the
//! global similarities picks the same pairs as one process does.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::data::batch::{decode_truth, CaptionTruth};
use crate::dist::{self, Comm};
use crate::error::{Error, Result};

/// One micro-batch's pairs held by this rank.
pub(super) struct LocalPart<'a> {
    /// The frozen tower's image features `[n, P, W]` (before the trained `ln_vision`).
    pub hidden: Tensor,
    pub ids: &'a [Vec<u32>],
    pub mask: &'a [Vec<u32>],
    /// ITC features `[n, Q, D]` and `[n, D]`, without a graph.
    pub img: Tensor,
    pub txt: Tensor,
    pub truths: &'a [Option<Arc<dyn CaptionTruth>>],
}

/// The global batch.
pub(super) struct Global {
    pub hidden: Tensor,
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
    pub img: Tensor,
    pub txt: Tensor,
    pub truths: Vec<Option<Arc<dyn CaptionTruth>>>,
    /// Where this rank's pairs of each micro-batch sit in the global order.
    pub mine: Vec<Range<usize>>,
    /// Global indices grouped by the rank that holds them (rank 0's first, each rank's in its
    /// own order): the layout of a reduce-scatter back to the owners.
    pub by_rank: Vec<usize>,
    /// Pairs held by each rank.
    pub per_rank: Vec<usize>,
}

/// Exchanges every micro-batch's parts among the ranks.
pub(super) fn exchange(comm: &dyn Comm, parts: &[LocalPart], device: &Device) -> Result<Global> {
    let size = comm.size();
    let (mut image, mut img, mut txt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ids, mut mask, mut truths) = (Vec::new(), Vec::new(), Vec::new());
    let mut owned: Vec<Vec<usize>> = vec![Vec::new(); size];
    let mut mine = Vec::with_capacity(parts.len());
    let (mut shapes, mut n) = (None, 0usize);
    for part in parts {
        let (_, p, w) = part.hidden.dims3()?;
        let (_, q, d) = part.img.dims3()?;
        shapes = Some((p, w, q, d));
        let longest = part.ids.iter().map(Vec::len).max().unwrap_or(0) as u64;
        let len = dist::all_gather_u64(comm, longest)?
            .into_iter()
            .max()
            .unwrap_or(0) as usize;
        let row = p * w + q * d + d + 2 * len;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(crate::nn::host::flat(t)?) };
        let (pi, pq, pt) = (flat(&part.hidden)?, flat(&part.img)?, flat(&part.txt)?);
        let rows = part.ids.len();
        let mut send = Vec::with_capacity(rows * row);
        for k in 0..rows {
            send.extend_from_slice(&pi[k * p * w..(k + 1) * p * w]);
            send.extend_from_slice(&pq[k * q * d..(k + 1) * q * d]);
            send.extend_from_slice(&pt[k * d..(k + 1) * d]);
            for t in [&part.ids[k], &part.mask[k]] {
                send.extend(t.iter().map(|&x| x as f32));
                send.resize(send.len() + len - t.len(), 0.0);
            }
        }
        let (all, counts) = dist::all_gather_varlen(comm, &send)?;
        let mut bytes = Vec::new();
        for t in part.truths {
            let e = t.as_ref().map(|t| t.encode()).unwrap_or_default();
            bytes.extend((e.len() as u16).to_le_bytes());
            bytes.extend(e);
        }
        let (all_truths, _) = dist::all_gather_varlen_bytes(comm, &bytes)?;
        let mut at_truth = 0usize;
        for (r, c) in counts.iter().enumerate() {
            let count = c / row.max(1);
            if r == comm.rank() {
                mine.push(n..n + count);
            }
            owned[r].extend(n..n + count);
            n += count;
        }
        for v in all.chunks_exact(row.max(1)) {
            let (a, rest) = v.split_at(p * w);
            let (b, rest) = rest.split_at(q * d);
            let (c, rest) = rest.split_at(d);
            image.extend_from_slice(a);
            img.extend_from_slice(b);
            txt.extend_from_slice(c);
            ids.push(rest[..len].iter().map(|&x| x as u32).collect());
            mask.push(rest[len..].iter().map(|&x| x as u32).collect());
            let l = all_truths
                .get(at_truth..at_truth + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
                .ok_or_else(|| Error::input("caption truths of a rank ended early"))?;
            let enc = &all_truths[at_truth + 2..at_truth + 2 + l];
            truths.push(match l {
                0 => None,
                _ => Some(decode_truth(enc).ok_or_else(|| {
                    Error::input("a rank sent a caption truth this build cannot read")
                })?),
            });
            at_truth += 2 + l;
        }
    }
    let (p, w, q, d) = shapes.ok_or_else(|| Error::input("a step with no micro-batch"))?;
    Ok(Global {
        hidden: Tensor::from_vec(image, (n, p, w), device)?,
        img: Tensor::from_vec(img, (n, q, d), device)?,
        txt: Tensor::from_vec(txt, (n, d), device)?,
        ids,
        mask,
        truths,
        mine,
        per_rank: owned.iter().map(Vec::len).collect(),
        by_rank: owned.concat(),
    })
}
