//! The `vit-b32` suite (for GPUs; tools/device-check.sh runs it beside PyTorch): the real
//! ViT-B/32 CLIP (configs/clip-vit-b32.toml: 224², patch 32, text context 77, vocabulary 49408)
//! training with AdamW and embedding images, at a batch size of the caller's choice, and one
//! vision layer's pieces timed apart.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use super::{median, train_phases, vit_b32_embed, vit_b32_spec, StepMode};
use crate::error::Result;
use crate::objectives::contrastive::ContrastiveLoss;

#[derive(Clone, Debug, Serialize)]
pub struct VitB32Report {
    pub device: String,
    pub batch: usize,
    /// How the step trains (`--precision`, also the embedding's; `--grad-checkpointing`).
    pub mode: StepMode,
    /// ViT-B/32 CLIP training (forward, backward, AdamW): median step and samples/s.
    pub train_step_ms: f64,
    pub train_samples_per_s: f64,
    /// Medians of the step's phases: forward (with graph) + loss, forward + backward, AdamW.
    pub train_forward_ms: f64,
    pub train_grads_ms: f64,
    pub train_optimizer_ms: f64,
    /// ViT-B/32 image embedding: median forward and images/s.
    pub embed_ms: f64,
    pub embed_images_per_s: f64,
    /// Whether cudarc tracked tensor uses with events (`bench --cuda-events`); null off CUDA.
    pub cuda_event_tracking: Option<bool>,
    /// One ViT-B/32 layer's pieces at this batch (vision: 50 tokens × 768), forward + backward,
    /// median ms each: where a step's time goes.
    pub ops_ms: Vec<(String, f64)>,
}

/// Median ms of `f` (after 2 untimed runs), each run ended by a device synchronisation.
fn time_ms(iters: usize, device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&times))
}

/// The building blocks of one ViT-B/32 vision layer at `batch`, each forward + backward through
/// the training path (trainable weights, so the differentiable compositions run off-CPU).
fn layer_ops(batch: usize, iters: usize, device: &Device) -> Result<Vec<(String, f64)>> {
    use crate::nn::{linear, Activation, LayerNorm};
    use candle_nn::Module;
    let (t, h, heads) = (50, 768, 12);
    let varmap = VarMap::new();
    let vb = crate::nn::init::seeded_var_builder(&varmap, 0, DType::F32, device);
    let fc1 = linear(h, 4 * h, vb.pp("fc1"))?;
    let norm = LayerNorm::new(vb.pp("ln"), h, 1e-5)?;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, t, h), device)?)?;
    let wide =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, t, 4 * h), device)?)?;
    let scores =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, heads, t, t), device)?)?;
    let backward = |y: Tensor| -> Result<()> {
        y.sum_all()?.backward()?;
        Ok(())
    };
    let mut out = Vec::new();
    out.push((
        "linear 768->3072 (fc1)".to_string(),
        time_ms(iters, device, || backward(fc1.forward(x.as_tensor())?))?,
    ));
    out.push((
        "layer_norm 768".to_string(),
        time_ms(iters, device, || backward(norm.forward(x.as_tensor())?))?,
    ));
    out.push((
        "quick_gelu 3072".to_string(),
        time_ms(iters, device, || {
            backward(Activation::QuickGelu.forward(wide.as_tensor())?)
        })?,
    ));
    out.push((
        "softmax 12x50x50".to_string(),
        time_ms(iters, device, || {
            backward(crate::nn::ops::softmax_last(scores.as_tensor())?)
        })?,
    ));
    out.push((
        "attention 12 heads".to_string(),
        time_ms(iters, device, || {
            let v = x.as_tensor();
            backward(crate::nn::attention::multi_head(v, v, v, heads, None)?)
        })?,
    ));
    // fc1's product alone, forward, no graph: cuBLAS through candle, against torch's `x @ Wᵀ`
    // (tools/reference/bench_torch_gpu.py times the same rows).
    let rows = x.as_tensor().detach().reshape((batch * t, h))?;
    let w = Tensor::randn(0f32, 0.02, (4 * h, h), device)?;
    out.push((
        format!("matmul {}x{h}x{} (forward)", batch * t, 4 * h),
        time_ms(iters, device, || {
            rows.matmul(&w.t()?)?;
            Ok(())
        })?,
    ));
    Ok(out)
}

/// The `vit-b32` suite at `batch`: `iters` timed iterations of each after 2 untimed.
pub fn run_vit_b32(
    iters: usize,
    batch: usize,
    mode: StepMode,
    device: &Device,
) -> Result<VitB32Report> {
    let p = train_phases(
        &vit_b32_spec(),
        49408,
        ContrastiveLoss::InfoNce,
        batch,
        2,
        iters,
        true,
        mode,
        device,
    )?;
    let train = median(&p.step);
    let embed = median(&vit_b32_embed(batch, 2, iters, mode.precision, device)?);
    Ok(VitB32Report {
        device: format!("{device:?}"),
        batch,
        mode,
        train_step_ms: train,
        train_samples_per_s: batch as f64 / (train / 1e3),
        train_forward_ms: median(&p.forward),
        train_grads_ms: median(&p.grads),
        train_optimizer_ms: median(&p.optimizer),
        embed_ms: embed,
        embed_images_per_s: batch as f64 / (embed / 1e3),
        cuda_event_tracking: crate::nn::device::event_tracking(device),
        ops_ms: layer_ops(batch, iters, device)?,
    })
}
