//! The ranks of an MPI job (`mpirun -np N vlalign train …`; Open MPI, or the MPI that SLURM's
//! `srun` starts) as a [`Comm`], through the rsmpi bindings.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the trainer's thread makes every call, and
//! a mutex around the communicator keeps any two calls from overlapping, which is what that
//! level requires of the program.

use std::sync::Mutex;

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::Comm;
use crate::error::{Error, Result};

/// The world communicator of an MPI job; MPI is finalised when it is dropped.
pub struct MpiComm {
    rank: usize,
    size: usize,
    world: Mutex<SimpleCommunicator>,
    _universe: mpi::environment::Universe,
}

// SAFETY: MPI runs at `MPI_THREAD_SERIALIZED` or above (checked in `init`), which allows calls
// from any thread as long as no two overlap; every call goes through the `world` mutex.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::input("MPI was already initialised in this process"))?;
        if level < Threading::Serialized {
            return Err(Error::input(format!(
                "the MPI library offers thread level {level:?}; vlalign needs Serialized"
            )));
        }
        let world = universe.world();
        Ok(Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world: Mutex::new(world),
            _universe: universe,
        })
    }

    fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // A panic while holding the lock leaves the communicator itself intact.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every rank of the job with `code` (MPI_Abort): a rank that fails alone would
    /// otherwise leave the others waiting in their next collective.
    pub fn abort(&self, code: i32) -> ! {
        self.world().abort(code)
    }
}

/// MPI counts elements in a C int.
fn count(n: usize) -> Result<()> {
    if n > i32::MAX as usize {
        return Err(Error::input(format!(
            "{n} elements in one MPI message (at most {})",
            i32::MAX
        )));
    }
    Ok(())
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather_u8(&self, send: &[u8]) -> Result<Vec<u8>> {
        count(send.len() * self.size)?;
        let mut recv = vec![0u8; send.len() * self.size];
        self.world().all_gather_into(send, &mut recv[..]);
        Ok(recv)
    }

    fn all_gather_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        count(send.len() * self.size)?;
        let mut recv = vec![0f32; send.len() * self.size];
        self.world().all_gather_into(send, &mut recv[..]);
        Ok(recv)
    }

    fn all_to_all_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        super::check_all_to_all(send.len(), self.size)?;
        count(send.len())?;
        let mut recv = vec![0f32; send.len()];
        self.world().all_to_all_into(send, &mut recv[..]);
        Ok(recv)
    }

    fn broadcast_u8(&self, buf: &mut [u8], root: usize) -> Result<()> {
        count(buf.len())?;
        let w = self.world();
        w.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        count(buf.len())?;
        let w = self.world();
        w.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
}
