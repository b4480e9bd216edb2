//! Seeded weight initialisation. candle cannot seed its CPU generator, so trainable variables
//! are created through this `VarBuilder` backend: each tensor's values come from a ChaCha stream
//! keyed by the run seed and the tensor's name, so initial weights do not depend on creation
//! order and the same seed gives the same model.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// FNV-1a of the name: a stable per-tensor stream id.
fn name_stream(name: &str) -> u64 {
    crate::rng::fnv1a(name.as_bytes())
}

/// Values of `init` for `shape` from the stream (`seed`, `name`), as float32 on the CPU.
pub fn seeded_values(init: &Init, shape: &Shape, seed: u64, name: &str) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = crate::rng::stream(seed, crate::rng::INIT, name_stream(name));
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> f32 {
        // Box–Muller; u1 in (0, 1] keeps the log finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random();
        (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    match *init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => (0..n).map(|_| normal(&mut rng, mean, stdev)).collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => (0..n).map(|_| normal(&mut rng, 0.0, std)).collect(),
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
                }
            }
        }
    }
}

/// A `VarMap`-backed builder whose new variables are seeded (see the module doc).
struct Seeded {
    varmap: VarMap,
    seed: u64,
    /// Tensors served as they are, never trainable (a frozen encoder).
    frozen: std::collections::HashMap<String, Tensor>,
    /// Starting values of trainable variables (a pretrained checkpoint), instead of seeded ones.
    initial: std::collections::HashMap<String, Tensor>,
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(t) = self.frozen.get(name) {
            if t.shape() != &s {
                candle_core::bail!(
                    "frozen tensor `{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    s.dims()
                );
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` exists with shape {:?}, asked for {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let t = match self.initial.get(name) {
            Some(t) if t.shape() != &s => candle_core::bail!(
                "initial value of `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            ),
            Some(t) => t.to_dtype(dtype)?.to_device(dev)?,
            None => {
                let values = seeded_values(&h, &s, self.seed, name);
                Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?
            }
        };
        let var = Var::from_tensor(&t)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        if let Some(t) = self.frozen.get(name) {
            return Ok(t.clone());
        }
        let data = self.varmap.data().lock().expect("varmap lock");
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::Msg(format!("no variable `{name}`")))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.frozen.contains_key(name)
            || self
                .varmap
                .data()
                .lock()
                .expect("varmap lock")
                .contains_key(name)
    }
}

/// A builder that creates seeded variables in `varmap`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    seeded_with_frozen(varmap, seed, Default::default(), dtype, device)
}

/// Like [`seeded_var_builder`], except that names in `frozen` get those tensors, untracked by
/// autograd and absent from `varmap` (BLIP-2's frozen image encoder).
pub fn seeded_with_frozen(
    varmap: &VarMap,
    seed: u64,
    frozen: std::collections::HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    seeded_with(varmap, seed, frozen, Default::default(), dtype, device)
}

/// Like [`seeded_with_frozen`], and variables named in `initial` start from those values (a
/// pretrained checkpoint) instead of seeded random ones.
pub fn seeded_with(
    varmap: &VarMap,
    seed: u64,
    frozen: std::collections::HashMap<String, Tensor>,
    initial: std::collections::HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Seeded {
            varmap: varmap.clone(),
            seed,
            frozen,
            initial,
        }),
        dtype,
        device.clone(),
    )
}

/// Serves a map of tensors as plain (frozen) ones and lets go of each as it is served.
struct Taking {
    tensors: std::sync::Mutex<std::collections::HashMap<String, Tensor>>,
}

impl Taking {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Tensor>> {
        // A poisoned lock only means a constructor panicked; the map itself is intact.
        self.tensors.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SimpleBackend for Taking {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.lock().remove(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("no tensor `{name}` (or it was asked for twice)"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }
}

/// A builder over `tensors` (an inference model's weights) that drops its hold on each tensor
/// once the model has taken it, so that a layer keeping its weight in another layout
/// (`nn::linear`'s frozen weights) replaces it instead of holding both while the model loads.
/// Each name can be taken once.
pub fn taking(
    tensors: std::collections::HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Taking {
            tensors: std::sync::Mutex::new(tensors),
        }),
        dtype,
        device.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_any_order() {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 2.0,
        };
        let s = Shape::from((50, 40));
        let a = seeded_values(&init, &s, 5, "w");
        assert_eq!(a, seeded_values(&init, &s, 5, "w"));
        assert_ne!(a, seeded_values(&init, &s, 6, "w"));
        assert_ne!(a, seeded_values(&init, &s, 5, "v"));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.15 && (var.sqrt() - 2.0).abs() < 0.1,
            "{mean} {var}"
        );
        let u = seeded_values(&Init::Uniform { lo: -1.0, up: 3.0 }, &s, 1, "b");
        assert!(u.iter().all(|&x| (-1.0..3.0).contains(&x)));
    }

    /// `taking` serves each tensor once, as stored, and names what is wrong otherwise.
    #[test]
    fn taking_serves_each_tensor_once() {
        let dev = Device::Cpu;
        let t = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let map = std::collections::HashMap::from([("a".to_string(), t.clone())]);
        let vb = taking(map, DType::F32, &dev);
        assert!(vb.contains_tensor("a"));
        let got = vb.get((2, 3), "a").unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        assert!(!vb.contains_tensor("a"));
        let again = vb.get((2, 3), "a").unwrap_err().to_string();
        assert!(again.contains("no tensor `a`"), "{again}");
        let map = std::collections::HashMap::from([("a".to_string(), t.clone())]);
        let vb = taking(map, DType::F32, &dev);
        let err = vb.get((3, 2), "a").unwrap_err().to_string();
        assert!(err.contains("shape [2, 3]"), "{err}");
    }
}
