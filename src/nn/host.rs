//! Reads of tensor values into host memory on the training path, counted.
//!
//! On a GPU each read waits for the device to finish everything queued before it (and, with
//! candle's stream-ordered allocator, lets the driver trim its memory pool), so the number of
//! reads a training step makes is a cost to watch: the trainer reports it per step
//! (`host_reads_per_step` in metrics.jsonl) and tests bound it. Code under src/train,
//! src/objectives, src/models and src/nn reads through these functions (tests/architecture.rs
//! checks it); the CPU-only kernels (`fused_attention`) read their own host tensors directly.
//! Inference and evaluation read their results where they use them.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Result, Tensor, WithDType};

static READS: AtomicU64 = AtomicU64::new(0);

/// How many reads this process has made through this module (every device counts, so a CPU run
/// shows what a GPU run of the same code would wait for; ranks that are threads of one process,
/// as in the data-parallel tests, count together).
pub fn reads() -> u64 {
    READS.load(Ordering::Relaxed)
}

fn counted<T>(read: impl FnOnce() -> Result<T>) -> Result<T> {
    READS.fetch_add(1, Ordering::Relaxed);
    read()
}

/// The value of a one-element tensor (any shape of one element, any dtype), as `T`.
pub fn scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    if t.elem_count() != 1 {
        candle_core::bail!("expected one value, got a tensor of shape {:?}", t.dims());
    }
    counted(|| t.to_dtype(T::DTYPE)?.flatten_all()?.get(0)?.to_scalar())
}

/// [`scalar`] as f32.
pub fn f32_of(t: &Tensor) -> Result<f32> {
    scalar(t)
}

/// [`scalar`] as f64.
pub fn f64_of(t: &Tensor) -> Result<f64> {
    scalar(t)
}

/// All values of `t` (any shape) in row-major order, converted to `T`'s dtype.
pub fn flat<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    counted(|| t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1())
}

/// The rows of a matrix, converted to `T`'s dtype.
pub fn rows<T: WithDType>(t: &Tensor) -> Result<Vec<Vec<T>>> {
    counted(|| t.to_dtype(T::DTYPE)?.to_vec2())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reads_convert_and_count() {
        let dev = Device::Cpu;
        let before = reads();
        let s = Tensor::new(2.5f32, &dev).unwrap();
        assert_eq!(f32_of(&s).unwrap(), 2.5);
        assert_eq!(f64_of(&s.reshape((1, 1)).unwrap()).unwrap(), 2.5);
        let m = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        assert_eq!(flat::<f64>(&m).unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(rows::<f32>(&m).unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
        assert!(
            f32_of(&m).is_err(),
            "a matrix is not one value (and is not read)"
        );
        // Other tests in this binary may read meanwhile: at least these four.
        assert!(reads() - before >= 4);
    }
}
