//! Strict checkpoint loading: a `VarBuilder` backend over memory-mapped safetensors that records
//! which tensors the model asked for, so that a missing, extra or wrong-shaped tensor is an
//! error naming the tensor and both shapes, never a silent partial load. A checkpoint stored under
//! another family's names (open_clip) is read through a name map whose every entry says which
//! part of which stored tensor it is ([`Take`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Requested name → stored name and the part of it, when the stored names are another
    /// family's.
    remap: Option<Arc<Remap>>,
    /// Suffixes of stored tensors that no model reads (non-persistent or training-only buffers).
    ignored: Vec<String>,
}

type Remap = BTreeMap<String, (String, Take)>;

/// Which part of a stored tensor a requested tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    Whole,
    /// Rows `[index·n/of, (index+1)·n/of)` of dimension 0 (a packed q|k|v projection).
    Chunk {
        index: usize,
        of: usize,
    },
    /// The transpose of a matrix (an `[in, out]` projection as a Linear `[out, in]` weight).
    Transpose,
    /// A scalar stored as `[]` or `[1]`.
    Scalar,
}

impl Take {
    /// The shape taken from a stored tensor of shape `stored`, or `None` when it does not fit.
    pub fn shape(self, stored: &[usize]) -> Option<Vec<usize>> {
        match (self, stored) {
            (Take::Whole, s) => Some(s.to_vec()),
            (Take::Chunk { of, .. }, [n, rest @ ..]) if of > 0 && n % of == 0 => {
                Some([&[n / of], rest].concat())
            }
            (Take::Transpose, [a, b]) => Some(vec![*b, *a]),
            (Take::Scalar, [] | [1]) => Some(vec![]),
            _ => None,
        }
    }

    fn apply(self, t: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Take::Whole => Ok(t),
            Take::Chunk { index, of } => {
                let n = t.dim(0)? / of;
                t.narrow(0, index * n, n)?.contiguous()
            }
            Take::Transpose => t.t()?.contiguous(),
            Take::Scalar => t.reshape(()),
        }
    }
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
            remap: None,
            ignored: Vec::new(),
        })
    }

    /// Opens one safetensors file whose tensors are stored under another family's names;
    /// `to_ours(stored)` gives the names (and parts) the model asks for, `None` for a tensor
    /// the model does not have (an error naming it, unless it ends in one of `ignored_suffixes`).
    pub fn open_remapped(
        file: &Path,
        to_ours: impl Fn(&str) -> Option<Vec<(String, Take)>>,
        ignored_suffixes: &[&str],
    ) -> Result<Self> {
        if !file.is_file() {
            return Err(Error::weights(file, "missing"));
        }
        // SAFETY: as in `open`.
        let files = unsafe { MmapedSafetensors::new(file) }
            .map_err(|e| Error::weights(file, format!("cannot read safetensors: {e}")))?;
        let mut remap = Remap::new();
        for (stored, view) in files.tensors() {
            if ignored_suffixes.iter().any(|s| stored.ends_with(s)) {
                continue;
            }
            let Some(ours) = to_ours(&stored) else {
                return Err(Error::weights(
                    file,
                    format!(
                        "unexpected tensor `{stored}` {:?}: not a tensor of the supported model",
                        view.shape()
                    ),
                ));
            };
            for (name, take) in ours {
                if take.shape(view.shape()).is_none() {
                    return Err(Error::weights(
                        file,
                        format!(
                            "tensor `{stored}` has shape {:?}, which cannot be split into `{name}`",
                            view.shape()
                        ),
                    ));
                }
                remap.insert(name, (stored.clone(), take));
            }
        }
        Ok(Self {
            files: Arc::new(files),
            origin: file.to_path_buf(),
            used: Arc::default(),
            remap: Some(Arc::new(remap)),
            ignored: ignored_suffixes.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The names the model asks for: the stored names, or the name map's.
    pub fn model_names(&self) -> Vec<String> {
        match &self.remap {
            Some(r) => r.keys().cloned().collect(),
            None => self.names(),
        }
    }

    /// Every tensor under the names the model asks for (through the name map when there is
    /// one), each checked finite, in `dtype` on `device`.
    pub fn all(&self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        let backend = self.backend();
        self.model_names()
            .into_iter()
            .map(|n| {
                let t = backend
                    .fetch(&n, None, dtype, device)
                    .map_err(|e| Error::weights(&self.origin, e.to_string()))?;
                Ok((n, t))
            })
            .collect()
    }

    fn backend(&self) -> Checked {
        Checked {
            files: self.files.clone(),
            used: self.used.clone(),
            remap: self.remap.clone(),
        }
    }

    /// A builder whose tensors are converted to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.backend()), dtype, device.clone())
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
            .filter(|n| {
                let ignored = ignored_suffixes.iter().any(|s| n.ends_with(s))
                    || self.ignored.iter().any(|s| n.ends_with(s.as_str()));
                !used.contains(n) && !ignored
            })
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
    remap: Option<Arc<Remap>>,
}

impl Checked {
    /// The stored tensor and part behind a requested name.
    fn source(&self, name: &str) -> Option<(String, Take)> {
        match &self.remap {
            None => Some((name.to_string(), Take::Whole)),
            Some(r) => r.get(name).cloned(),
        }
    }

    /// Loads `name`, checking its shape against `expected` when given.
    fn fetch(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let missing = || {
            let shape = expected.map(|s| format!(" (the config expects shape {s:?})"));
            candle_core::Error::Msg(format!(
                "missing tensor `{name}`{}",
                shape.unwrap_or_default()
            ))
        };
        let (stored, take) = self.source(name).ok_or_else(missing)?;
        let view = self.files.get(&stored).map_err(|_| missing())?;
        if let Some(want) = expected {
            let have = take.shape(view.shape()).unwrap_or_default();
            if have != want {
                let from = if stored == name {
                    String::new()
                } else {
                    format!(" (from `{stored}` {:?})", view.shape())
                };
                candle_core::bail!(
                    "tensor `{name}`{from} has shape {have:?}, the config expects {want:?}"
                );
            }
        }
        self.used
            .lock()
            .expect("weights lock poisoned")
            .insert(stored.clone());
        if let Some(i) = first_non_finite(view.dtype(), view.data()) {
            candle_core::bail!(
                "tensor `{stored}` holds a non-finite value (NaN or infinity) at element {i}: the \
                 checkpoint is corrupt or diverged, and would score every input the same"
            );
        }
        take.apply(self.files.load(&stored, dev)?)?.to_dtype(dtype)
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
        self.fetch(name, Some(s.dims()), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source(name)
            .is_some_and(|(stored, _)| self.files.get(&stored).is_ok())
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
