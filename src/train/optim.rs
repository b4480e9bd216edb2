//! AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's exact update, weight decay grouped
//! as in open_clip (no decay on biases, norms, embedding tables and the temperature), and
//! global-norm gradient clipping.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};

use super::adamw_cpu;

/// Gradients by variable name.
/// Gradients by variable name, in sorted order: the clipping norm sums them in this order, so
/// the same seed gives bit-identical runs (a `HashMap` iterates in a random order per run).
pub type Grads = std::collections::BTreeMap<String, Tensor>;

/// Adds `part` into `total`, name by name (the callers add parts in a fixed order).
pub fn add_grads(total: &mut Grads, part: Grads) -> candle_core::Result<()> {
    for (name, g) in part {
        match total.get_mut(&name) {
            Some(t) => *t = (&*t + &g)?,
            None => {
                total.insert(name, g);
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// The optimiser settings of a config's `[train]` section.
    pub fn of(t: &crate::train::config::TrainSpec) -> Self {
        Self {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }
}

/// Whether a variable is decayed: matrices are, except embedding tables and learned tokens;
/// vectors and scalars (biases, LayerNorm weights, class embedding, logit scale) are not.
pub fn decays(name: &str, rank: usize) -> bool {
    const TABLES: [&str; 6] = [
        "token_embedding",
        "position_embedding",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "query_tokens",
    ];
    rank >= 2 && !TABLES.iter().any(|t| name.contains(t))
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    step: u64,
}

impl AdamW {
    /// Sorted by name, so the state file and the update order do not depend on hash order.
    /// There must be at least one variable.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        if vars.is_empty() {
            candle_core::bail!("AdamW got no variables to train");
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Two storages: the CPU update writes each moment in place.
                Ok(Param {
                    decay: decays(&name, var.rank()),
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            params,
            step: 0,
        })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Names of the decayed and the undecayed variables.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (d, n): (Vec<&Param>, Vec<&Param>) = self.params.iter().partition(|p| p.decay);
        (
            d.iter().map(|p| p.name.as_str()).collect(),
            n.iter().map(|p| p.name.as_str()).collect(),
        )
    }

    /// One update at learning rate `lr`. A variable without a gradient is left as it is (its
    /// moments too), as torch does for `grad is None`.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            if adamw_cpu::supported(&[p.var.as_tensor(), &p.m, &p.v, g]) {
                let step = adamw_cpu::Step {
                    decay: (p.decay && c.weight_decay != 0.0).then_some(1.0 - lr * c.weight_decay),
                    inv_bc2_sqrt: 1.0 / bc2_sqrt,
                    eps: c.eps,
                    lr_over_bc1: lr / bc1,
                };
                let moments = (&p.m, &p.v);
                adamw_cpu::update(p.var.as_tensor(), moments, g, (c.beta1, c.beta2), &step)?;
                continue;
            }
            let mut theta = p.var.as_tensor().detach();
            if p.decay && c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let update = (p.m.div(&denom)? * (lr / bc1))?;
            p.var.set(&(theta - update)?)?;
        }
        Ok(())
    }

    /// The moments and the step count, for `optimizer.safetensors`.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            // Copies: the CPU update writes the moments in place.
            out.insert(format!("exp_avg.{}", p.name), p.m.copy()?);
            out.insert(format!("exp_avg_sq.{}", p.name), p.v.copy()?);
        }
        let device = self.params[0].var.device();
        out.insert("step".into(), Tensor::new(self.step as f64, device)?);
        Ok(out)
    }

    /// Restores [`AdamW::state`]; every variable's moments must be present with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks `{k}`")))
        };
        for p in &mut self.params {
            let dev = p.var.device().clone();
            let m = get(&format!("exp_avg.{}", p.name))?;
            let v = get(&format!("exp_avg_sq.{}", p.name))?;
            if m.dims() != p.var.dims() || v.dims() != p.var.dims() {
                candle_core::bail!(
                    "optimizer state for `{}` has shape {:?}, the variable is {:?}",
                    p.name,
                    m.dims(),
                    p.var.dims()
                );
            }
            // Copies of their own: the CPU update writes the moments in place.
            p.m = m.to_dtype(p.var.dtype())?.to_device(&dev)?.copy()?;
            p.v = v.to_dtype(p.var.dtype())?.to_device(&dev)?.copy()?;
        }
        self.step = crate::nn::host::f64_of(get("step")?)? as u64;
        Ok(())
    }
}

/// Scales the gradients in place so their global L2 norm is at most `max_norm`
/// (torch.nn.utils.clip_grad_norm_); returns the norm before clipping, a one-element float64
/// tensor on the gradients' device (`None` without gradients).
///
/// Nothing is read to the host: like PyTorch, every gradient is multiplied by
/// min(1, max_norm / (norm + 1e-6)) computed on the device, so a GPU step does not wait here
/// (the trainer reads the norm only when it logs it). The squares are summed in float64 in the
/// gradients' name order, one addition after another, so the norm is the same bit for bit on
/// every run and device order-wise; a factor of exactly 1 leaves a gradient unchanged.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for g in grads.values() {
        let sq = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
        total = Some(match total {
            Some(t) => (t + sq)?,
            None => sq,
        });
    }
    let Some(total) = total else {
        return Ok(None);
    };
    let norm = total.sqrt()?;
    let max = Tensor::new(max_norm, norm.device())?;
    let coef = max.div(&norm.affine(1.0, 1e-6)?)?.minimum(1.0)?;
    for g in grads.values_mut() {
        *g = g.broadcast_mul(&coef.to_dtype(g.dtype())?)?;
    }
    Ok(Some(norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_groups_follow_open_clip() {
        assert!(decays("vision_model.encoder.layers.0.mlp.fc1.weight", 2));
        assert!(decays("vision_model.embeddings.patch_embedding.weight", 4));
        assert!(decays("visual_projection.weight", 2));
        assert!(!decays("vision_model.encoder.layers.0.mlp.fc1.bias", 1));
        assert!(!decays("text_model.final_layer_norm.weight", 1));
        assert!(!decays("text_model.embeddings.token_embedding.weight", 2));
        assert!(!decays(
            "text_model.embeddings.position_embedding.weight",
            2
        ));
        assert!(!decays("vision_model.embeddings.class_embedding", 1));
        assert!(!decays("logit_scale", 0));
        assert!(!decays("query_tokens", 3));
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = candle_core::Device::Cpu;
        let mut g: Grads = Grads::new();
        g.insert("a".into(), Tensor::new(&[3f32, 0.0], &dev).unwrap());
        g.insert("b".into(), Tensor::new(&[4f32], &dev).unwrap());
        let norm = |g: &mut Grads, max| {
            crate::nn::host::f64_of(&clip_grad_norm(g, max).unwrap().unwrap()).unwrap()
        };
        let n = norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        let a = g["a"].to_vec1::<f32>().unwrap();
        assert!((a[0] - 0.6).abs() < 1e-5, "{a:?}");
        let n = norm(&mut g, 10.0);
        assert!((n - 1.0).abs() < 1e-5);
        assert!((g["b"].to_vec1::<f32>().unwrap()[0] - 0.8).abs() < 1e-5);
        assert!(clip_grad_norm(&mut Grads::new(), 1.0).unwrap().is_none());
    }
}
