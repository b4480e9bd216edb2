//! The ranks of an MPI job on GPUs, talking through NCCL (`--features nccl`, built by
//! `VLALIGN_CUDA_FEATURES=cuda,nccl bash tools/build-cuda.sh`): rank 0 creates NCCL's unique id
//! and MPI broadcasts it, then every collective runs on this rank's GPU stream.
//!
//! The trainer hands the [`Comm`] host buffers, so each call copies them to the GPU and back;
//! what NCCL brings over the MPI path is the transport (NVLink, InfiniBand with GPUDirect). The
//! rank-order reductions of `dist` stay as they are (all-to-all as NCCL grouped send/receive,
//! sum on the host, all-gather), so a run on NCCL sums in the same order as one on MPI.
//!
//! Not yet run: it needs a machine with two GPUs or more (the note of the data-parallel issue
//! says which checks are owed).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::safe::{Comm as Nccl, Id, NcclType};

use super::mpi::MpiComm;
use super::Comm;
use crate::error::{Error, Result};

/// One rank's NCCL communicator on one GPU stream.
pub struct NcclComm {
    rank: usize,
    size: usize,
    nccl: Mutex<Nccl>,
    stream: Arc<CudaStream>,
}

// SAFETY: the NCCL communicator is only used under the mutex, one call at a time, which is
// what NCCL requires of a communicator shared between threads.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::input(format!("NCCL {what}: {e:?}"))
}

impl NcclComm {
    /// This MPI rank's NCCL communicator over `stream` (the rank's GPU).
    pub fn init(mpi: &MpiComm, stream: Arc<CudaStream>) -> Result<Self> {
        let (rank, size) = (mpi.rank(), mpi.size());
        let mut id = [0u8; 128];
        if rank == 0 {
            let made = Id::new().map_err(|e| nccl_err("unique id", e))?;
            for (b, c) in id.iter_mut().zip(made.internal()) {
                *b = *c as u8;
            }
        }
        mpi.broadcast_u8(&mut id, 0)?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let nccl =
            Nccl::from_rank(stream.clone(), rank, size, id).map_err(|e| nccl_err("init", e))?;
        Ok(Self {
            rank,
            size,
            nccl: Mutex::new(nccl),
            stream,
        })
    }

    fn nccl(&self) -> std::sync::MutexGuard<'_, Nccl> {
        self.nccl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn to_gpu<T: DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(x)
            .map_err(|e| nccl_err("host to device copy", e))
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| nccl_err("allocation", e))
    }

    fn to_host<T: DeviceRepr>(&self, x: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut v = self
            .stream
            .clone_dtoh(x)
            .map_err(|e| nccl_err("device to host copy", e))?;
        v.truncate(n);
        Ok(v)
    }

    fn gather<T: DeviceRepr + ValidAsZeroBits + NcclType + Clone>(
        &self,
        send: &[T],
    ) -> Result<Vec<T>> {
        let d = self.to_gpu(send)?;
        let mut out = self.zeros::<T>(send.len() * self.size)?;
        self.nccl()
            .all_gather(&d, &mut out)
            .map_err(|e| nccl_err("all-gather", e))?;
        self.to_host(&out, send.len() * self.size)
    }

    fn bcast<T: DeviceRepr + ValidAsZeroBits + NcclType + Copy>(
        &self,
        buf: &mut [T],
        root: usize,
    ) -> Result<()> {
        let mut d = self.to_gpu(buf)?;
        self.nccl()
            .broadcast_in_place(&mut d, root as i32)
            .map_err(|e| nccl_err("broadcast", e))?;
        buf.copy_from_slice(&self.to_host(&d, buf.len())?);
        Ok(())
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather_u8(&self, send: &[u8]) -> Result<Vec<u8>> {
        self.gather(send)
    }

    fn all_gather_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        self.gather(send)
    }

    fn all_to_all_f32(&self, send: &[f32]) -> Result<Vec<f32>> {
        super::check_all_to_all(send.len(), self.size)?;
        let chunk = send.len() / self.size;
        let d = self.to_gpu(send)?;
        let mut parts: Vec<CudaSlice<f32>> = (0..self.size)
            .map(|_| self.zeros::<f32>(chunk))
            .collect::<Result<_>>()?;
        if chunk > 0 {
            let nccl = self.nccl();
            let mut g = nccl.group();
            for (k, part) in parts.iter_mut().enumerate() {
                g.send(d.slice(k * chunk..(k + 1) * chunk), k as i32)
                    .map_err(|e| nccl_err("send", e))?;
                g.recv(part.slice_mut(0..chunk), k as i32)
                    .map_err(|e| nccl_err("receive", e))?;
            }
        }
        let mut out = Vec::with_capacity(send.len());
        for p in &parts {
            out.extend(self.to_host(p, chunk)?);
        }
        Ok(out)
    }

    fn broadcast_u8(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.bcast(buf, root)
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.bcast(buf, root)
    }
}
