//! AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's exact update, weight decay grouped
//! as in open_clip (no decay on biases, norms, embedding tables and the temperature), and
//! global-norm gradient clipping.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};

use super::{adamw_fused, sumsq_fused};

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

/// How [`AdamW::step_by`] updates: fused where [`adamw_fused::supported`] says so (training),
/// or one way throughout ([`check_fused_optimizer`]).
#[derive(Clone, Copy)]
enum Path {
    Auto,
    Fused,
    Composed,
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
                // Two storages: the fused update writes each moment in place.
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
        self.step_by(grads, lr, Path::Auto)
    }

    fn step_by(&mut self, grads: &Grads, lr: f64, path: Path) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let step = adamw_fused::Step {
                decay: (p.decay && c.weight_decay != 0.0).then_some(1.0 - lr * c.weight_decay),
                inv_bc2_sqrt: 1.0 / bc2_sqrt,
                eps: c.eps,
                lr_over_bc1: lr / bc1,
            };
            let betas = (c.beta1, c.beta2);
            let fused = match path {
                Path::Auto => adamw_fused::supported(&[p.var.as_tensor(), &p.m, &p.v, g]),
                Path::Fused => true,
                Path::Composed => false,
            };
            if fused {
                adamw_fused::update(p.var.as_tensor(), (&p.m, &p.v), g, betas, &step)?;
            } else {
                composed_update(&p.var, (&mut p.m, &mut p.v), g, betas, &step)?;
            }
        }
        Ok(())
    }

    /// The moments and the step count, for `optimizer.safetensors`.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            // Copies: the fused update writes the moments in place.
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
            // Copies of their own: the fused update writes the moments in place.
            p.m = m.to_dtype(p.var.dtype())?.to_device(&dev)?.copy()?;
            p.v = v.to_dtype(p.var.dtype())?.to_device(&dev)?.copy()?;
        }
        self.step = crate::nn::host::f64_of(get("step")?)? as u64;
        Ok(())
    }
}

/// One AdamW update composed from candle ops (any device, type and layout): new moment tensors
/// and a new value for `var`, in the arithmetic adamw_fused.rs's passes repeat.
fn composed_update(
    var: &Var,
    (m, v): (&mut Tensor, &mut Tensor),
    g: &Tensor,
    (beta1, beta2): (f64, f64),
    step: &adamw_fused::Step,
) -> Result<()> {
    let mut theta = var.as_tensor().detach();
    if let Some(d) = step.decay {
        theta = (theta * d)?;
    }
    *m = ((&*m * beta1)? + (g * (1.0 - beta1))?)?;
    *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let denom = ((v.sqrt()? * step.inv_bc2_sqrt)? + step.eps)?;
    let update = (m.div(&denom)? * step.lr_over_bc1)?;
    var.set(&(theta - update)?)
}

/// The optimizer's fused ops against their compositions on `device`, as rows for `vlalign bench
/// --suite kernels`. AdamW: three steps of the fused update and of [`composed_update`] from the
/// same variables (a decayed `[64, 768]` matrix and an undecayed `[768]` vector) and gradients —
/// `(name, max |Δθ| / max |θ|, the same for the two moments)`. Row `adamw`: the fused passes against the composition on `device` (float32's
/// rounding apart; on the CPU the same bits, so 0). On CUDA also `adamw = cpu`: the CUDA passes
/// against the CPU's from the same inputs, which round alike and must agree exactly (0); and
/// `grad norm sumsq`: the clip's fused sum of squares (sumsq_fused.rs) against the composition's.
/// The fused ops run whether or not `VLALIGN_FUSED_CUDA=1` is set.
pub fn check_fused_optimizer(device: &candle_core::Device) -> Result<Vec<(String, f32, f32)>> {
    let cpu = candle_core::Device::Cpu;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.2,
    };
    let shapes: [&[usize]; 2] = [&[64, 768], &[768]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 1.0, *s, &cpu))
        .collect::<Result<_>>()?;
    let grads: Vec<Vec<Tensor>> = (0..3)
        .map(|_| {
            shapes
                .iter()
                .map(|s| Tensor::randn(0f32, 1e-2, *s, &cpu))
                .collect()
        })
        .collect::<Result<_>>()?;
    // (θ, m, v) per variable after three steps, fused or composed, on `dev`.
    let run = |dev: &candle_core::Device, path: Path| -> Result<Vec<[Tensor; 3]>> {
        let names = ["w", "b"];
        let vars = init
            .iter()
            .zip(names)
            .map(|(t, n)| Ok((n.to_string(), Var::from_tensor(&t.to_device(dev)?)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut opt = AdamW::new(vars, cfg)?;
        for step_grads in &grads {
            let mut g = Grads::new();
            for (n, t) in names.iter().zip(step_grads) {
                g.insert(n.to_string(), t.to_device(dev)?);
            }
            opt.step_by(&g, 1e-2, path)?;
        }
        opt.params
            .iter()
            .map(|p| {
                let host = |t: &Tensor| t.to_device(&cpu);
                Ok([host(p.var.as_tensor())?, host(&p.m)?, host(&p.v)?])
            })
            .collect()
    };
    // max over variables of (θ's relative difference, the moments').
    let diff = |a: &[[Tensor; 3]], c: &[[Tensor; 3]]| -> Result<(f32, f32)> {
        let mut out = (0f32, 0f32);
        for (a, c) in a.iter().zip(c) {
            out.0 = out.0.max(crate::nn::fused::rel(&a[0], &c[0])?);
            out.1 = out.1.max(crate::nn::fused::rel(&a[1], &c[1])?);
            out.1 = out.1.max(crate::nn::fused::rel(&a[2], &c[2])?);
        }
        Ok(out)
    };
    let fused = run(device, Path::Fused)?;
    let (value, moments) = diff(&fused, &run(device, Path::Composed)?)?;
    let mut rows = vec![("adamw".to_string(), value, moments)];
    if device.is_cuda() {
        let (value, moments) = diff(&fused, &run(&cpu, Path::Fused)?)?;
        rows.push(("adamw = cpu".to_string(), value, moments));
        // The clip's sum of squares in one op per gradient, against the composition's float32
        // sums added in float64 (the gradients of the update above).
        let gs: Vec<Tensor> = grads[0]
            .iter()
            .map(|g| g.to_device(device))
            .collect::<Result<_>>()?;
        let mut fused = Tensor::zeros((), DType::F64, device)?;
        let mut composed = fused.clone();
        for g in &gs {
            fused = sumsq_fused::onto(g, &fused)?;
            composed = (composed + g.sqr()?.sum_all()?.to_dtype(DType::F64)?)?;
        }
        let value = crate::nn::fused::rel(
            &fused.to_dtype(DType::F32)?,
            &composed.to_dtype(DType::F32)?,
        )?;
        rows.push(("grad norm sumsq".to_string(), value, 0.0));
    }
    Ok(rows)
}

/// Scales the gradients in place so their global L2 norm is at most `max_norm`
/// (torch.nn.utils.clip_grad_norm_); returns the norm before clipping, a one-element float64
/// tensor on the gradients' device (`None` without gradients).
///
/// Nothing is read to the host: like PyTorch, every gradient is multiplied by
/// min(1, max_norm / (norm + 1e-6)) computed on the device, so a GPU step does not wait here
/// (the trainer reads the norm only when it logs it). Each gradient's squares are summed (in
/// float32 by candle's reduction; in float64 by sumsq_fused.rs on CUDA with the fused kernels)
/// and those sums added in float64 in the gradients' name order, one addition after another, so
/// the norm is the same bit for bit on every run; a factor of exactly 1 leaves a gradient
/// unchanged.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    // On CUDA with the fused kernels each gradient's sum goes onto the running total in one op
    // (sumsq_fused.rs): for all gradients or none, so that a step does not mix the two sums.
    let fused = grads.values().all(sumsq_fused::supported);
    for g in grads.values() {
        total = Some(match (total, fused) {
            (Some(t), true) => sumsq_fused::onto(g, &t)?,
            (None, true) => sumsq_fused::onto(g, &Tensor::zeros((), DType::F64, g.device())?)?,
            (t, false) => {
                let sq = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
                match t {
                    Some(t) => (t + sq)?,
                    None => sq,
                }
            }
        });
    }
    let Some(total) = total else {
        return Ok(None);
    };
    let norm = total.sqrt()?;
    let max = Tensor::new(max_norm, norm.device())?;
    let coef = max.div(&norm.affine(1.0, 1e-6)?)?.minimum(1.0)?;
    // The factor in each gradient type, cast once (not once per gradient: a launch each on a GPU).
    let mut cast: Vec<Tensor> = Vec::new();
    for g in grads.values_mut() {
        let c = match cast.iter().position(|c| c.dtype() == g.dtype()) {
            Some(i) => &cast[i],
            None => {
                cast.push(coef.to_dtype(g.dtype())?);
                cast.last().expect("just pushed")
            }
        };
        *g = g.broadcast_mul(c)?;
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

    /// On the CPU the fused passes and the composition give the same bits (adamw_fused.rs's
    /// invariant), so the check that `vlalign bench --suite kernels` runs on a GPU reports 0.
    #[test]
    fn fused_optimizer_check_reports_no_difference_on_the_cpu() {
        let rows = check_fused_optimizer(&candle_core::Device::Cpu).unwrap();
        assert_eq!(rows, vec![("adamw".to_string(), 0.0, 0.0)]);
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
