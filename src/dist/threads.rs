//! Ranks as threads of one process ([`ThreadComm`]): the communicator `cargo test` uses to
//! check that N ranks train exactly as one process, with no MPI installed.
//!
//! A collective is one exchange round: every rank deposits its buffer, the last to arrive opens
//! the round for reading, each rank copies what it needs, and the last reader clears the round
//! for the next one. A rank whose handle is dropped (its thread ended, by an error or normally)
//! leaves the group: a rank waiting for it in a round then gets an error instead of waiting
//! forever.

use std::sync::{Arc, Condvar, Mutex};

use super::Comm;
use crate::error::{Error, Result};

/// One rank of an in-process group made by [`ThreadComm::group`].
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

#[derive(Default)]
struct Round {
    /// Each rank's deposit in the current round.
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// True once every rank has deposited: ranks copy, then the last reader clears.
    reading: bool,
    read: usize,
    /// Ranks whose handle was dropped.
    left: Vec<bool>,
}

impl ThreadComm {
    /// `size` connected ranks, in rank order; give each to its own thread.
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                slots: vec![None; size],
                left: vec![false; size],
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// One round: deposits `data`, waits for every rank, and returns `read` of all deposits
    /// (in rank order).
    fn exchange<R>(&self, data: Vec<u8>, read: impl FnOnce(&[&[u8]]) -> R) -> Result<R> {
        let s = &*self.shared;
        let lock = |e: std::sync::PoisonError<_>| {
            drop(e);
            Error::input("a rank of the thread group panicked")
        };
        let mut g = s.round.lock().map_err(lock)?;
        // The previous round may still be being read by slower ranks.
        while g.reading {
            g = s.changed.wait(g).map_err(lock)?;
        }
        g.slots[self.rank] = Some(data);
        g.arrived += 1;
        if g.arrived == s.size {
            g.reading = true;
            s.changed.notify_all();
        }
        while !g.reading {
            if let Some(k) = g.left.iter().position(|&l| l) {
                return Err(Error::input(format!(
                    "rank {k} of {} left the run while rank {} waited for it",
                    s.size, self.rank
                )));
            }
            g = s.changed.wait(g).map_err(lock)?;
        }
        let out = {
            let views: Vec<&[u8]> = g
                .slots
                .iter()
                .map(|x| x.as_deref().unwrap_or(&[]))
                .collect();
            read(&views)
        };
        g.read += 1;
        if g.read == s.size {
            g.slots.iter_mut().for_each(|x| *x = None);
            g.arrived = 0;
            g.read = 0;
            g.reading = false;
            s.changed.notify_all();
        }
        Ok(out)
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        if let Ok(mut g) = self.shared.round.lock() {
            g.left[self.rank] = true;
            self.shared.changed.notify_all();
        }
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
}

/// Every deposit must have `len` bytes (the callers' contract; a mismatch is a bug in the run).
fn check_lengths(views: &[&[u8]], len: usize, what: &str) -> Result<()> {
    match views.iter().position(|v| v.len() != len) {
        Some(k) => Err(Error::input(format!(
            "{what}: rank {k} sent {} bytes, expected {len}",
            views[k].len()
        ))),
        None => Ok(()),
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather_u8(&self, send: &[u8]) -> Result<Vec<u8>> {
        let len = send.len();
        self.exchange(send.to_vec(), |v| {
            check_lengths(v, len, "all-gather")?;
            Ok(v.concat())
        })?
    }

    fn all_gather_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        Ok(bytes_f32(&self.all_gather_u8(&f32_bytes(send))?).collect())
    }

    fn all_to_all_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        let size = self.size();
        super::check_all_to_all(send.len(), size)?;
        let (len, chunk, me) = (send.len() * 4, send.len() / size * 4, self.rank);
        self.exchange(f32_bytes(send), |v| {
            check_lengths(v, len, "all-to-all")?;
            Ok(v.iter()
                .flat_map(|b| bytes_f32(&b[me * chunk..(me + 1) * chunk]))
                .collect())
        })?
    }

    fn broadcast_u8(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::input(format!(
                "broadcast from rank {root} of {}",
                self.size()
            )));
        }
        let len = buf.len();
        let data = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let got = self.exchange(data, |v| v[root].to_vec())?;
        if got.len() != len {
            return Err(Error::input(format!(
                "broadcast: rank {root} sent {} bytes, rank {} expected {len}",
                got.len(),
                self.rank
            )));
        }
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut bytes = f32_bytes(buf);
        self.broadcast_u8(&mut bytes, root)?;
        for (x, v) in buf.iter_mut().zip(bytes_f32(&bytes)) {
            *x = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_that_leaves_stops_the_others_waiting() {
        let mut group = ThreadComm::group(2);
        let second = group.pop().unwrap();
        let first = group.pop().unwrap();
        let waiter = std::thread::spawn(move || first.all_gather_u8(&[1]));
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(second);
        let err = waiter.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("rank 1 of 2 left"), "{err}");
    }

    #[test]
    fn all_to_all_routes_chunk_k_to_rank_k() {
        let handles: Vec<_> = ThreadComm::group(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let send: Vec<f32> = (0..6).map(|i| (c.rank() * 10 + i) as f32).collect();
                    // Several rounds back to back: no round may see the next one's deposits.
                    let mut out = Vec::new();
                    for _ in 0..5 {
                        out = c.all_to_all_f32(&send).unwrap();
                    }
                    out
                })
            })
            .collect();
        let out: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(out[0], vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        assert_eq!(out[2], vec![4.0, 5.0, 14.0, 15.0, 24.0, 25.0]);
    }
}
