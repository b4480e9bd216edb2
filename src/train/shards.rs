//! The parallel shards of a training step: the Q-Former's pass 2 and BLIP-2 stage 2 split a
//! micro-batch into [`SHARDS`] fixed row ranges whose gradients are added in order, so the sums
//! are the same on any core count. Each shard runs in a rayon pool of its own with an equal
//! part of the global pool's threads (at least one), which the kernels it calls split their
//! work over. With both shards' kernels feeding the one global pool, every product and row loop
//! was shared out between two cores already busy with the other shard: a 2-core Q-Former step
//! ran ~1.2× faster than on one core instead of ~1.6×. The pools' threads live across steps
//! (fresh threads each step made the kernel zero new allocator pages, ~20% of a stage-2 step).
//! Results do not depend on the pools: every kernel splits its work in fixed pieces.

use std::sync::OnceLock;

use rayon::ThreadPool;

use crate::error::{Error, Result};

/// Row ranges a micro-batch is split into.
pub const SHARDS: usize = 2;

/// The shards' pools, made on first use.
fn pools() -> Result<&'static [ThreadPool]> {
    static POOLS: OnceLock<Vec<ThreadPool>> = OnceLock::new();
    if let Some(p) = POOLS.get() {
        return Ok(p);
    }
    let threads = (rayon::current_num_threads() / SHARDS).max(1);
    let pools = (0..SHARDS)
        .map(|k| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("shard-{k}-{i}"))
                .build()
                .map_err(|e| Error::input(format!("cannot start the shard threads: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(POOLS.get_or_init(|| pools))
}

/// `f` over each of `items` (at most [`SHARDS`]), item k in pool k, all at once; the results
/// in item order. A shard that panics gives an error naming `what`.
pub fn run<I: Sync, T: Send>(
    what: &str,
    items: &[I],
    f: impl Fn(&I) -> Result<T> + Sync,
) -> Result<Vec<Result<T>>> {
    if items.len() > SHARDS {
        return Err(Error::input(format!(
            "{what}: {} shards for {SHARDS} shard pools",
            items.len()
        )));
    }
    let pools = pools()?;
    let f = &f;
    Ok(std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .iter()
            .zip(pools)
            .map(|(item, pool)| scope.spawn(move || pool.install(|| f(item))))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::input(format!("a {what} shard panicked"))))
            })
            .collect()
    }))
}
