//! `vlalign bench --suite comm`: the trainer's gradient all-reduce ([`dist::all_reduce_sum`])
//! timed over the ranks of this job at growing buffer sizes — `mpirun -np N vlalign bench
//! --suite comm` (a `--features mpi` build) for MPI processes, otherwise two in-process thread
//! ranks. Each row gives the median time and the bus bandwidth, `bytes · 2(N−1)/N / time`, the
//! bytes each rank moves in a bandwidth-optimal all-reduce (NCCL's convention).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::dist::{self, threads::ThreadComm, Comm};
use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct CommRow {
    pub ranks: usize,
    pub floats: usize,
    pub bytes: usize,
    pub median_ms: f64,
    pub bus_gb_per_s: f64,
}

/// All-reduces of `floats` f32 values for each size, `iters` timed after one untimed; every rank
/// runs it, rank 0's times are returned (the others get an empty list).
pub fn run_on(comm: &dyn Comm, sizes: &[usize], iters: usize) -> Result<Vec<CommRow>> {
    let n = comm.size();
    let mut rows = Vec::new();
    for &floats in sizes {
        let mut buf: Vec<f32> = (0..floats).map(|i| (i % 7) as f32).collect();
        dist::all_reduce_sum(comm, &mut buf)?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            // Every rank starts together: the gather of one byte is the barrier.
            comm.all_gather_u8(&[0])?;
            let t = Instant::now();
            dist::all_reduce_sum(comm, &mut buf)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let s = super::bench::median(&times);
        let bytes = floats * 4;
        rows.push(CommRow {
            ranks: n,
            floats,
            bytes,
            median_ms: s * 1e3,
            bus_gb_per_s: bytes as f64 * 2.0 * (n - 1) as f64 / n as f64 / s / 1e9,
        });
    }
    Ok(if comm.rank() == 0 { rows } else { Vec::new() })
}

/// [`run_on`] over `ranks` thread ranks of this process.
pub fn run_threads(ranks: usize, sizes: &[usize], iters: usize) -> Result<Vec<CommRow>> {
    let sizes = Arc::new(sizes.to_vec());
    let handles: Vec<_> = ThreadComm::group(ranks)
        .into_iter()
        .map(|c| {
            let sizes = sizes.clone();
            std::thread::spawn(move || run_on(&c, &sizes, iters))
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        let rows = h
            .join()
            .map_err(|_| Error::input("a thread rank panicked"))??;
        out.extend(rows);
    }
    Ok(out)
}
