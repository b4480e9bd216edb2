//! CLIP's ResNet image encoder (Radford et al. 2021, §2.4: ResNet-50 with ResNet-D's three-conv
//! stem and average-pool downsampling, antialiased strides, and attention pooling in place of
//! global average pooling), as open_clip builds it (modified_resnet.py `ModifiedResNet`,
//! `Bottleneck`, `AttentionPool2d`), under open_clip's tensor names (there is no transformers
//! twin). BatchNorm normalises with its running statistics for inference ([`ModifiedResNet::forward`])
//! and with the batch's in training ([`ModifiedResNet::forward_train`]), which can also move the
//! running statistics as PyTorch's `BatchNorm2d` does (momentum 0.1, unbiased variance).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::ops::softmax_last;
use crate::nn::pool::avg_pool2d as avg_pool;

/// PyTorch's BatchNorm2d epsilon and momentum.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// How BatchNorm normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    /// With the running statistics (inference).
    Eval,
    /// With the batch's statistics; `update` also moves the running statistics toward them.
    Train { update: bool },
}

/// The shape of a ModifiedResNet (open_clip `CLIPVisionCfg` with `layers` as four numbers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Bottleneck blocks in each of the four stages (RN50: [3, 4, 6, 3]).
    pub layers: [usize; 4],
    /// Stem and first-stage width (RN50: 64); stage s has `width · 2^s` planes, ×4 out.
    pub width: usize,
    /// Attention-pooling heads (open_clip: `width · 32 / head_width`).
    pub heads: usize,
    pub image_size: usize,
    /// The joint-space width (`embed_dim`): attention pooling projects to it.
    pub output_dim: usize,
}

impl ResNetConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.layers.iter().any(|&n| n == 0 || n > 64) {
            return Err(format!(
                "vision layers {:?}: each stage needs 1..=64 blocks",
                self.layers
            ));
        }
        if self.width < 2 || !self.width.is_multiple_of(2) || self.width > 1024 {
            return Err(format!(
                "vision width {} must be even, 2..=1024",
                self.width
            ));
        }
        let embed = self.width * 32;
        if self.heads == 0 || !embed.is_multiple_of(self.heads) {
            return Err(format!(
                "attention pooling: {embed} channels do not split into {} heads",
                self.heads
            ));
        }
        if !(32..=4096).contains(&self.image_size) {
            return Err(format!(
                "image_size {} must be 32..=4096 for a ResNet (it downsamples 32x)",
                self.image_size
            ));
        }
        Ok(())
    }

    /// Side of the final feature map: the stem and three stages each halve (floor).
    pub fn grid(&self) -> usize {
        // conv1 stride 2 (padding 1, kernel 3): ceil(n / 2); then four floor halvings.
        let mut n = self.image_size.div_ceil(2);
        for _ in 0..4 {
            n /= 2;
        }
        n
    }
}

/// A convolution without bias, PyTorch's `[out, in, k, k]` weight.
#[derive(Clone, Debug)]
struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Self> {
        let fan_in = (cin * k * k) as f64;
        let weight = vb.get_with_hints(
            (cout, cin, k, k),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_in).sqrt(),
            },
        )?;
        Ok(Self {
            weight,
            stride,
            padding: k / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::nn::conv::conv2d(x, &self.weight, self.padding, self.stride)
    }
}

/// BatchNorm2d: in inference form `(x − running_mean) / √(running_var + ε) · weight + bias`; in
/// training form with the batch's statistics ([`crate::nn::batch_norm::train`]).
#[derive(Clone, Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?,
            running_mean: vb.get_with_hints(c, "running_mean", candle_nn::Init::Const(0.0))?,
            running_var: vb.get_with_hints(c, "running_var", candle_nn::Init::Const(1.0))?,
        })
    }

    /// The norm of `x`, then ReLU when `relu`.
    fn forward(&self, x: &Tensor, mode: BnMode, relu: bool) -> Result<Tensor> {
        let update = match mode {
            BnMode::Eval => {
                let c = self.weight.dim(0)?;
                let scale = (&self.weight / (&self.running_var + BN_EPS)?.sqrt()?)?;
                let shift = (&self.bias - (&self.running_mean * &scale)?)?;
                let y = x
                    .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
                    .broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
                return if relu { y.relu() } else { Ok(y) };
            }
            BnMode::Train { update } => update,
        };
        let (n, _, h, w) = x.dims4()?;
        let count = n * h * w;
        let out = crate::nn::batch_norm::train(x, &self.weight, &self.bias, BN_EPS, relu)?;
        if update {
            // Only a trainable model's statistics are variables (shared with its VarMap).
            if self.running_mean.is_variable() && self.running_var.is_variable() {
                let unbiased = (out.var * (count as f64 / (count - 1) as f64))?;
                let m = BN_MOMENTUM;
                let new_mean = ((&self.running_mean * (1.0 - m))? + (out.mean * m)?)?;
                let new_var = ((&self.running_var * (1.0 - m))? + (unbiased * m)?)?;
                candle_core::Var::from_tensor(&self.running_mean)?.set(&new_mean)?;
                candle_core::Var::from_tensor(&self.running_var)?.set(&new_var)?;
            }
        }
        Ok(out.y)
    }
}

/// open_clip's `Bottleneck` (expansion 4): 1×1, 3×3, average pool by the stride, 1×1, each
/// convolution followed by BatchNorm (ReLU but after the last); the shortcut average-pools,
/// then a 1×1 convolution and BatchNorm, when the shape changes.
#[derive(Clone, Debug)]
struct Bottleneck {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Conv,
    bn3: BatchNorm,
    stride: usize,
    /// `downsample.0` (conv) and `downsample.1` (BatchNorm); open_clip's `downsample.-1` is
    /// the average pool, without weights.
    downsample: Option<(Conv, BatchNorm)>,
}

impl Bottleneck {
    fn new(vb: VarBuilder, inplanes: usize, planes: usize, stride: usize) -> Result<Self> {
        let out = planes * 4;
        let downsample = (stride > 1 || inplanes != out)
            .then(|| -> Result<_> {
                Ok((
                    Conv::new(vb.pp("downsample.0"), inplanes, out, 1, 1)?,
                    BatchNorm::new(vb.pp("downsample.1"), out)?,
                ))
            })
            .transpose()?;
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), inplanes, planes, 1, 1)?,
            bn1: BatchNorm::new(vb.pp("bn1"), planes)?,
            conv2: Conv::new(vb.pp("conv2"), planes, planes, 3, 1)?,
            bn2: BatchNorm::new(vb.pp("bn2"), planes)?,
            conv3: Conv::new(vb.pp("conv3"), planes, out, 1, 1)?,
            bn3: BatchNorm::new(vb.pp("bn3"), out)?,
            stride,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        let h = self.bn1.forward(&self.conv1.forward(x)?, mode, true)?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?, mode, true)?;
        let h = avg_pool(&h, self.stride)?;
        let h = self.bn3.forward(&self.conv3.forward(&h)?, mode, false)?;
        let identity = match &self.downsample {
            None => x.clone(),
            Some((conv, bn)) => {
                bn.forward(&conv.forward(&avg_pool(x, self.stride)?)?, mode, false)?
            }
        };
        crate::nn::residual::add_relu(&h, &identity)
    }
}

/// open_clip's `AttentionPool2d`: the feature map's mean is prepended as a query token, a
/// positional embedding added, and one multi-head attention of that token over all of them
/// (its own q/k/v projections) is projected by `c_proj` to the output width.
#[derive(Clone, Debug)]
struct AttentionPool {
    positional_embedding: Tensor,
    q: crate::nn::Linear,
    k: crate::nn::Linear,
    v: crate::nn::Linear,
    c_proj: crate::nn::Linear,
    heads: usize,
}

impl AttentionPool {
    fn new(vb: VarBuilder, grid: usize, embed: usize, heads: usize, out: usize) -> Result<Self> {
        let std = (embed as f64).powf(-0.5);
        Ok(Self {
            positional_embedding: vb.get_with_hints(
                (grid * grid + 1, embed),
                "positional_embedding",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            q: crate::nn::linear(embed, embed, vb.pp("q_proj"))?,
            k: crate::nn::linear(embed, embed, vb.pp("k_proj"))?,
            v: crate::nn::linear(embed, embed, vb.pp("v_proj"))?,
            c_proj: crate::nn::linear(embed, out, vb.pp("c_proj"))?,
            heads,
        })
    }

    /// `[B, C, H, W]` → `[B, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use candle_nn::Module;
        let (b, c, h, w) = x.dims4()?;
        let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?; // [B, HW, C]
        let mean = tokens.mean_keepdim(1)?;
        let tokens = Tensor::cat(&[&mean, &tokens], 1)?;
        let n = h * w + 1;
        if self.positional_embedding.dim(0)? != n {
            candle_core::bail!(
                "attention pooling: a {h}x{w} feature map needs {n} positions, the model has {} \
                 (the image size does not match the checkpoint)",
                self.positional_embedding.dim(0)?
            );
        }
        let tokens = tokens.broadcast_add(&self.positional_embedding)?;
        let d = c / self.heads;
        let split = |t: Tensor, len: usize| -> Result<Tensor> {
            t.reshape((b, len, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        // Only the mean token's output is used, so only its query is computed.
        let q = split(self.q.forward(&tokens.narrow(1, 0, 1)?)?, 1)?;
        let k = split(self.k.forward(&tokens)?, n)?;
        let v = split(self.v.forward(&tokens)?, n)?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (d as f64).sqrt())?;
        let attn = softmax_last(&scores)?; // [B, heads, 1, N]
        let o = attn.matmul(&v)?; // [B, heads, 1, d]
        let o = o.transpose(1, 2)?.reshape((b, c))?;
        self.c_proj.forward(&o)
    }
}

/// The whole tower: `[B, 3, S, S]` pixels → `[B, output_dim]` image features (already in the
/// joint space: attention pooling is the projection).
#[derive(Clone, Debug)]
pub struct ModifiedResNet {
    stem: [(Conv, BatchNorm); 3],
    stages: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool,
    cfg: ResNetConfig,
}

impl ModifiedResNet {
    /// `vb` points at open_clip's `visual`.
    pub fn new(vb: VarBuilder, cfg: &ResNetConfig) -> Result<Self> {
        let w = cfg.width;
        let stem = [
            (
                Conv::new(vb.pp("conv1"), 3, w / 2, 3, 2)?,
                BatchNorm::new(vb.pp("bn1"), w / 2)?,
            ),
            (
                Conv::new(vb.pp("conv2"), w / 2, w / 2, 3, 1)?,
                BatchNorm::new(vb.pp("bn2"), w / 2)?,
            ),
            (
                Conv::new(vb.pp("conv3"), w / 2, w, 3, 1)?,
                BatchNorm::new(vb.pp("bn3"), w)?,
            ),
        ];
        let mut inplanes = w;
        let mut stages = Vec::new();
        for (s, &blocks) in cfg.layers.iter().enumerate() {
            let planes = w << s;
            let stride = if s == 0 { 1 } else { 2 };
            let vs = vb.pp(format!("layer{}", s + 1));
            let mut stage = vec![Bottleneck::new(vs.pp("0"), inplanes, planes, stride)?];
            inplanes = planes * 4;
            for j in 1..blocks {
                stage.push(Bottleneck::new(vs.pp(j.to_string()), inplanes, planes, 1)?);
            }
            stages.push(stage);
        }
        let attnpool = AttentionPool::new(
            vb.pp("attnpool"),
            cfg.grid(),
            w * 32,
            cfg.heads,
            cfg.output_dim,
        )?;
        Ok(Self {
            stem,
            stages,
            attnpool,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Inference: BatchNorm with the running statistics.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.run(pixels, BnMode::Eval)
    }

    /// Training: BatchNorm with the batch's statistics; `update_stats` also moves the running
    /// statistics (once per batch: a recomputation of the same batch passes `false`).
    pub fn forward_train(&self, pixels: &Tensor, update_stats: bool) -> Result<Tensor> {
        self.run(
            pixels,
            BnMode::Train {
                update: update_stats,
            },
        )
    }

    fn run(&self, pixels: &Tensor, mode: BnMode) -> Result<Tensor> {
        let mut x = pixels.to_dtype(DType::F32)?;
        for (conv, bn) in &self.stem {
            x = bn.forward(&conv.forward(&x)?, mode, true)?;
        }
        x = avg_pool(&x, 2)?;
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x, mode)?;
            }
        }
        self.attnpool.forward(&x)
    }
}
