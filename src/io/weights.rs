//! Strict checkpoint loading: a `VarBuilder` backend over memory-mapped safetensors that records
//! which tensors the model asked for, so that a missing, extra or wrong-shaped tensor is an
//! error naming the tensor and both shapes, never a silent partial load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The safetensors file(s) of one model directory.
pub struct Weights {
    files: Arc<MmapedSafetensors>,
    /// The directory, for messages.
    origin: PathBuf,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl Weights {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let idx: serde_json::Value = super::json::read_json(&index)?;
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "no `weight_map` object"))?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let pickle = ["pytorch_model.bin", "model.pt", "model.pth"]
                .iter()
                .find(|f| dir.join(f).exists());
            let msg = match pickle {
                Some(f) => format!(
                    "no model.safetensors (found {f}: vlalign reads safetensors only, never pickle; \
                     convert it with transformers' save_pretrained(..., safe_serialization=True))"
                ),
                None => "no model.safetensors (or model.safetensors.index.json) in the model directory"
                    .to_string(),
            };
            return Err(Error::weights(dir, msg));
        };
        for p in &paths {
            if !p.is_file() {
                return Err(Error::weights(
                    p,
                    "weight shard listed in the index is missing",
                ));
            }
        }
        // SAFETY: the files are mapped read-only; a concurrent writer would be a user error that
        // safetensors' header checks turn into an error rather than undefined reads of the header.
        let files = unsafe { MmapedSafetensors::multi(&paths) }
            .map_err(|e| Error::weights(dir, format!("cannot read safetensors: {e}")))?;
        Ok(Self {
            files: Arc::new(files),
            origin: dir.to_path_buf(),
            used: Arc::default(),
        })
    }

    /// A builder whose tensors are converted to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = Checked {
            files: self.files.clone(),
            used: self.used.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Runs a model constructor over this checkpoint, then checks nothing stored was left unused.
    /// Errors from the constructor (missing or wrong-shaped tensors) are reported against the
    /// directory.
    pub fn build<M>(
        &self,
        dtype: DType,
        device: &Device,
        ignored_suffixes: &[&str],
        f: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<M> {
        let model = f(self.var_builder(dtype, device))
            .map_err(|e| Error::weights(&self.origin, e.to_string()))?;
        self.check_all_used(ignored_suffixes)?;
        Ok(model)
    }

    /// Names of all tensors stored, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        names
    }

    /// Errors on the first stored tensor the model never asked for, except names ending in one of
    /// `ignored_suffixes` (non-persistent buffers that older checkpoints carry, e.g. `position_ids`).
    pub fn check_all_used(&self, ignored_suffixes: &[&str]) -> Result<()> {
        let used = self.used.lock().expect("weights lock poisoned");
        let extra: Vec<String> = self
            .names()
            .into_iter()
            .filter(|n| !used.contains(n) && !ignored_suffixes.iter().any(|s| n.ends_with(s)))
            .collect();
        if let Some(first) = extra.first() {
            let shape = self
                .files
                .get(first)
                .map(|v| v.shape().to_vec())
                .unwrap_or_default();
            return Err(Error::weights(
                &self.origin,
                format!(
                    "unexpected tensor `{first}` {shape:?} that the config's model does not have \
                     ({} unexpected in all); is config.json the one these weights were saved with?",
                    extra.len()
                ),
            ));
        }
        Ok(())
    }
}

struct Checked {
    files: Arc<MmapedSafetensors>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl Checked {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.used
            .lock()
            .expect("weights lock poisoned")
            .insert(name.to_string());
        let view = self.files.get(name)?;
        if let Some(i) = first_non_finite(view.dtype(), view.data()) {
            candle_core::bail!(
                "tensor `{name}` holds a non-finite value (NaN or infinity) at element {i}: the \
                 checkpoint is corrupt or diverged, and would score every input the same"
            );
        }
        self.files.load(name, dev)?.to_dtype(dtype)
    }
}

/// The index of the first NaN or infinite element of stored float data (little-endian, as
/// safetensors stores it); `None` for integer dtypes and all-finite data. Read from the mapped
/// file, before anything is copied to a device.
pub fn first_non_finite(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<usize> {
    use safetensors::Dtype;
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        Dtype::F64 => bytes.chunks_exact(8).position(|b| {
            !f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).is_finite()
        }),
        // Half precision: all exponent bits set means infinity or NaN.
        Dtype::F16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        _ => None,
    }
}

impl SimpleBackend for Checked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let view = self.files.get(name).map_err(|_| {
            candle_core::Error::Msg(format!(
                "missing tensor `{name}` (the config expects shape {:?})",
                s.dims()
            ))
        })?;
        if view.shape() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, the config expects {:?}",
                view.shape(),
                s.dims()
            )));
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::first_non_finite;
    use safetensors::Dtype;

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            first_non_finite(Dtype::F32, &f32s(&[1.0, -2.0, 3e38])),
            None
        );
        assert_eq!(
            first_non_finite(Dtype::F32, &f32s(&[1.0, f32::NAN])),
            Some(1)
        );
        assert_eq!(
            first_non_finite(Dtype::F32, &f32s(&[f32::NEG_INFINITY])),
            Some(0)
        );
        let f64s: Vec<u8> = [0.5f64, f64::INFINITY]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(Dtype::F64, &f64s), Some(1));
        // float16: 1.0 = 0x3c00, 65504 (max) = 0x7bff, inf = 0x7c00, NaN = 0x7e00.
        let h = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(first_non_finite(Dtype::F16, &h(&[0x3c00, 0x7bff])), None);
        assert_eq!(first_non_finite(Dtype::F16, &h(&[0x3c00, 0x7e00])), Some(1));
        assert_eq!(first_non_finite(Dtype::F16, &h(&[0xfc00])), Some(0));
        // bfloat16: 1.0 = 0x3f80, max = 0x7f7f, inf = 0x7f80, NaN = 0x7fc0.
        assert_eq!(first_non_finite(Dtype::BF16, &h(&[0x3f80, 0x7f7f])), None);
        assert_eq!(first_non_finite(Dtype::BF16, &h(&[0x7fc0])), Some(0));
        assert_eq!(first_non_finite(Dtype::I64, &[0xff; 16]), None);
    }
}
