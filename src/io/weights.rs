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
        self.files.load(name, dev)?.to_dtype(dtype)
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
