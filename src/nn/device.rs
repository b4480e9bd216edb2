//! What a device needs once, before models run on it.
//!
//! On CUDA, candle allocates every tensor from the device's stream-ordered memory pool
//! (`cuMemAllocAsync`). The pool's release threshold defaults to 0: at every synchronisation —
//! each host read of a loss, each timed step — the driver hands all freed memory back to the
//! system, and the next step maps it again, tensor by tensor. PyTorch keeps freed blocks in its
//! caching allocator (and its `cudaMallocAsync` backend raises this threshold for the same
//! reason); [`prepare`] does the same for candle's pool, so a training step reuses the memory
//! of the one before. `VLALIGN_CUDA_POOL_TRIM=1` keeps the driver's default (for comparing).

use candle_core::{Device, Result};

/// Readies `device`: on CUDA, the memory pool keeps what is freed (release threshold = the
/// maximum); on the CPU nothing. The binary calls it wherever it opens a device.
pub fn prepare(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        if std::env::var("VLALIGN_CUDA_POOL_TRIM").as_deref() != Ok("1") {
            keep_freed_memory(gpu)?;
        }
    }
    let _ = device;
    Ok(())
}

#[cfg(feature = "cuda")]
fn keep_freed_memory(gpu: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let stream = gpu.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        // No stream-ordered pool: candle allocates synchronously, nothing to keep.
        return Ok(());
    }
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut threshold = u64::MAX;
    // SAFETY: the device comes from the live context; the release threshold is a u64
    // attribute, and `threshold` outlives the call.
    unsafe {
        let pool =
            result::device::get_mem_pool(ctx.cu_device()).map_err(candle_core::Error::wrap)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(candle_core::Error::wrap)?;
    }
    Ok(())
}

/// Whether cudarc tracks each tensor's uses with CUDA events on `device` (`None` off CUDA).
///
/// candle runs every CUDA tensor on the per-thread default stream of the thread that launches
/// its kernel; cudarc records an event after each launch for each argument and makes the next
/// launch wait on it, which is what keeps a tensor made by one thread correct when another
/// thread's stream reads it (the Q-Former's shard threads do). Each record and wait is a driver
/// call on the host, per argument per launch.
pub fn event_tracking(device: &Device) -> Option<bool> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(gpu) => Some(gpu.is_event_tracking()),
        _ => None,
    }
}

/// Turns event tracking ([`event_tracking`]) off for the tensors created on `device` from now
/// on; does nothing off CUDA.
///
/// # Safety
/// Every kernel on such tensors must be launched from one thread (so one stream orders them
/// all): no training with the Q-Former's or stage 2's shard threads, no tensor handed between
/// threads that both launch work on it.
pub unsafe fn disable_event_tracking(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        // SAFETY: the caller launches everything from one thread (above).
        unsafe { gpu.disable_event_tracking() };
    }
    let _ = device;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_needs_nothing() {
        assert!(prepare(&Device::Cpu).is_ok());
        assert_eq!(event_tracking(&Device::Cpu), None);
        // SAFETY: nothing to order on the CPU.
        unsafe { disable_event_tracking(&Device::Cpu) };
    }
}
