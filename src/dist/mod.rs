//! Communication between the ranks of a data-parallel run ([`Comm`]): one process ([`Single`]),
//! threads of one process ([`threads::ThreadComm`], so that plain `cargo test` runs 2 and 4
//! ranks), or the processes of an MPI job (`mpi::MpiComm`, behind the `mpi` feature; on GPUs
//! `nccl::NcclComm`, behind `nccl`).
//!
//! Implementations provide four primitives on byte and f32 buffers (all-gather, all-to-all,
//! broadcast); the reductions are built here on top of them so that every implementation sums
//! in the same fixed order and hands every rank the same bits: an all-reduce is an all-to-all
//! (rank k receives chunk k of every rank's buffer), a sum in rank order, and an all-gather of
//! the summed chunks — the reduce-scatter + all-gather of a ring all-reduce, moving the same
//! 2·(N−1)/N of the buffer per rank, but deterministic (MPI's own `MPI_Allreduce` may pick
//! its summation order by message size, and an order change moves the last bits).

pub mod threads;

#[cfg(feature = "mpi")]
pub mod mpi;

#[cfg(feature = "nccl")]
pub mod nccl;

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The ranks of a data-parallel run, seen from one of them. Every rank must make the same
/// calls in the same order (a collective waits for all ranks).
pub trait Comm: Send + Sync {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// How many ranks the run has.
    fn size(&self) -> usize;
    /// Every rank's `send`, concatenated in rank order; every rank passes the same length.
    fn all_gather_u8(&self, send: &[u8]) -> Result<Vec<u8>>;
    /// Every rank's `send`, concatenated in rank order; every rank passes the same length.
    fn all_gather_f32(&self, send: &[f32]) -> Result<Vec<f32>>;
    /// `send` holds `size` equal chunks; chunk k goes to rank k. Returns the chunk each rank
    /// sent to this one, in rank order.
    fn all_to_all_f32(&self, send: &[f32]) -> Result<Vec<f32>>;
    /// Rank `root`'s `buf` into every rank's `buf` (equal lengths).
    fn broadcast_u8(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Rank `root`'s `buf` into every rank's `buf` (equal lengths).
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;
}

/// A run of one process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_u8(&self, send: &[u8]) -> Result<Vec<u8>> {
        Ok(send.to_vec())
    }
    fn all_gather_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        Ok(send.to_vec())
    }
    fn all_to_all_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        Ok(send.to_vec())
    }
    fn broadcast_u8(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
}

/// How many ranks an MPI launcher started this job with (Open MPI's `mpirun`, or a PMI-based
/// launcher such as SLURM's `srun`), when one did.
pub fn launched_size() -> Option<usize> {
    env_count(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"])
}

/// This rank's place among the ranks on its machine, when a launcher says.
pub fn launched_local_rank() -> Option<usize> {
    env_count(&[
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ])
}

/// How many ranks of the job run on this machine, when a launcher says.
pub fn launched_local_size() -> Option<usize> {
    env_count(&[
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ])
}

fn env_count(keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// An all-to-all's buffer must split into one equal chunk per rank.
pub(crate) fn check_all_to_all(len: usize, size: usize) -> Result<()> {
    if !len.is_multiple_of(size) {
        return Err(Error::input(format!(
            "all-to-all of {len} values over {size} ranks"
        )));
    }
    Ok(())
}

/// The single-process communicator, shared.
pub fn single() -> Arc<dyn Comm> {
    Arc::new(Single)
}

/// The part of `n` items rank `rank` of `size` takes: contiguous, in rank order, sizes differing
/// by at most one (`n·r/size .. n·(r+1)/size`).
pub fn shard_range(n: usize, rank: usize, size: usize) -> Range<usize> {
    (n * rank / size)..(n * (rank + 1) / size)
}

/// Element-wise sum over ranks of `buf` (equal lengths everywhere), in place, identical on every
/// rank: part k ([`shard_range`]) is summed on rank k in rank order ([`reduce_scatter_sum`]),
/// then the sums are gathered.
pub fn all_reduce_sum(comm: &dyn Comm, buf: &mut [f32]) -> Result<()> {
    let size = comm.size();
    if size == 1 {
        return Ok(());
    }
    let counts: Vec<usize> = (0..size)
        .map(|k| shard_range(buf.len(), k, size).len())
        .collect();
    let mine = reduce_scatter_sum(comm, buf, &counts)?;
    let all = padded_gather(&mine, &counts, |x| comm.all_gather_f32(x))?;
    buf.copy_from_slice(&all);
    Ok(())
}

/// `recv` holds `size` chunks of `chunk` values: their element-wise sum, added in rank order.
fn sum_chunks(recv: &[f32], chunk: usize, size: usize) -> Vec<f32> {
    let mut acc = recv[..chunk].to_vec();
    for r in 1..size {
        for (a, x) in acc.iter_mut().zip(&recv[r * chunk..(r + 1) * chunk]) {
            *a += *x;
        }
    }
    acc
}

/// Reduce-scatter with uneven parts: `send` is the concatenation of one segment per rank
/// (segment k has `counts[k]` values, the same `counts` on every rank); rank k receives the
/// rank-order sum of every rank's segment k.
pub fn reduce_scatter_sum(comm: &dyn Comm, send: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
    let size = comm.size();
    if counts.len() != size || counts.iter().sum::<usize>() != send.len() {
        return Err(Error::input(format!(
            "reduce-scatter of {} values in segments {counts:?} over {size} ranks",
            send.len()
        )));
    }
    if size == 1 {
        return Ok(send.to_vec());
    }
    let chunk = counts.iter().copied().max().unwrap_or(0);
    let mut padded = vec![0f32; chunk * size];
    let mut at = 0;
    for (k, &c) in counts.iter().enumerate() {
        padded[k * chunk..k * chunk + c].copy_from_slice(&send[at..at + c]);
        at += c;
    }
    let recv = comm.all_to_all_f32(&padded)?;
    let mut out = sum_chunks(&recv, chunk, size);
    out.truncate(counts[comm.rank()]);
    Ok(out)
}

/// Every rank's `send` of any length, concatenated in rank order, and each rank's length.
pub fn all_gather_varlen(comm: &dyn Comm, send: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
    varlen(comm, send, |x| comm.all_gather_f32(x))
}

/// Every rank's `send` of any length, concatenated in rank order, and each rank's length.
pub fn all_gather_varlen_bytes(comm: &dyn Comm, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>)> {
    varlen(comm, send, |x| comm.all_gather_u8(x))
}

/// An all-gather of unequal lengths: the lengths first, then every part padded to the longest.
fn varlen<T: Copy + Default>(
    comm: &dyn Comm,
    send: &[T],
    gather: impl Fn(&[T]) -> Result<Vec<T>>,
) -> Result<(Vec<T>, Vec<usize>)> {
    let counts: Vec<usize> = all_gather_u64(comm, send.len() as u64)?
        .into_iter()
        .map(|c| c as usize)
        .collect();
    if comm.size() == 1 {
        return Ok((send.to_vec(), counts));
    }
    Ok((padded_gather(send, &counts, gather)?, counts))
}

/// Every rank's `send` (rank k's has `counts[k]` values), each padded to the longest for
/// `gather`, concatenated in rank order without the padding.
fn padded_gather<T: Copy + Default>(
    send: &[T],
    counts: &[usize],
    gather: impl Fn(&[T]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let chunk = counts.iter().copied().max().unwrap_or(0);
    let mut padded = send.to_vec();
    padded.resize(chunk, T::default());
    let all = gather(&padded)?;
    let mut out = Vec::with_capacity(counts.iter().sum());
    for (k, &c) in counts.iter().enumerate() {
        out.extend_from_slice(&all[k * chunk..k * chunk + c]);
    }
    Ok(out)
}

/// Every rank's `x`, in rank order.
pub fn all_gather_u64(comm: &dyn Comm, x: u64) -> Result<Vec<u64>> {
    all_gather_u64s(comm, &[x])
}

/// Every rank's `xs` (the same count on every rank), concatenated in rank order.
pub fn all_gather_u64s(comm: &dyn Comm, xs: &[u64]) -> Result<Vec<u64>> {
    let send: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let bytes = comm.all_gather_u8(&send)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Rank `root`'s bytes on every rank, whatever their length on the others.
pub fn broadcast_bytes(comm: &dyn Comm, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut len = (bytes.len() as u64).to_le_bytes();
    comm.broadcast_u8(&mut len, root)?;
    bytes.resize(u64::from_le_bytes(len) as usize, 0);
    comm.broadcast_u8(bytes, root)
}

#[cfg(test)]
mod tests {
    use super::threads::ThreadComm;
    use super::*;

    /// Runs `f` on every rank of an `n`-rank thread group, results in rank order.
    fn on_ranks<R: Send + 'static>(
        n: usize,
        f: impl Fn(&dyn Comm) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadComm::group(n)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(&c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn shard_ranges_cover_in_order() {
        for n in 0..20 {
            for size in 1..6 {
                let mut next = 0;
                for r in 0..size {
                    let s = shard_range(n, r, size);
                    assert_eq!(s.start, next);
                    assert!(s.len() + 1 >= n / size && s.len() <= n.div_ceil(size));
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    /// Rank r contributes r + 1 + i/8 at index i: the sum is exact in f32 and identical on
    /// every rank, for lengths that do and do not divide by the rank count.
    #[test]
    fn all_reduce_sums_in_order_on_every_rank() {
        for n in [2usize, 3, 4] {
            for len in [1usize, 5, 8, 13] {
                let out = on_ranks(n, move |c| {
                    let mut v: Vec<f32> = (0..len)
                        .map(|i| (c.rank() + 1) as f32 + i as f32 / 8.0)
                        .collect();
                    all_reduce_sum(c, &mut v).unwrap();
                    v
                });
                let want: Vec<f32> = (0..len)
                    .map(|i| (n * (n + 1) / 2) as f32 + n as f32 * i as f32 / 8.0)
                    .collect();
                for v in out {
                    assert_eq!(v, want);
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_and_varlen_gather_take_uneven_parts() {
        let counts = vec![2usize, 0, 3];
        let c2 = counts.clone();
        let out = on_ranks(3, move |c| {
            let send: Vec<f32> = (0..5).map(|i| (i * 10 + c.rank()) as f32).collect();
            let mine = reduce_scatter_sum(c, &send, &c2).unwrap();
            let local: Vec<f32> = (0..c.rank() + 1)
                .map(|i| (c.rank() * 100 + i) as f32)
                .collect();
            let (all, lens) = all_gather_varlen(c, &local).unwrap();
            (mine, all, lens)
        });
        // Segment values i·10 + rank summed over ranks 0, 1, 2: 3·i·10 + 3.
        assert_eq!(out[0].0, vec![3.0, 33.0]);
        assert!(out[1].0.is_empty());
        assert_eq!(out[2].0, vec![63.0, 93.0, 123.0]);
        for (_, all, lens) in &out {
            assert_eq!(lens, &vec![1, 2, 3]);
            assert_eq!(all, &vec![0.0, 100.0, 101.0, 200.0, 201.0, 202.0]);
        }
        let bad = reduce_scatter_sum(&Single, &[1.0, 2.0], &[3]);
        assert!(bad.unwrap_err().to_string().contains("segments"));
    }

    #[test]
    fn broadcast_bytes_resizes_to_the_root() {
        let out = on_ranks(3, |c| {
            let mut b = if c.rank() == 1 {
                b"from one".to_vec()
            } else {
                vec![7; 20]
            };
            broadcast_bytes(c, &mut b, 1).unwrap();
            b
        });
        for b in out {
            assert_eq!(b, b"from one");
        }
    }
}
