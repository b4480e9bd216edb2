//! Training configuration (TOML). Every key is documented in the presets under `configs/`;
//! unknown keys are errors naming the key and line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::clip::{ClipConfig, ClipTextConfig, ClipVisionConfig, ResNetConfig};
use crate::nn::Activation;
pub use crate::objectives::contrastive::ContrastiveLoss;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A CLIP to train (the `[model]` section); exactly one of `model` and `qformer` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// A BLIP-2 Q-Former to train in stage 1 on a frozen image encoder (the `[qformer]` section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qformer: Option<QformerSpec>,
    /// BLIP-2 stage 2: a trained Q-Former bridged to a frozen language model (the `[blip2]`
    /// section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blip2: Option<Blip2Spec>,
    /// A CLIP to fine-tune from a model directory (the `[finetune]` section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneSpec>,
    pub data: DataSpec,
    pub train: TrainSpec,
    /// Momentum distillation with feature queues (the `[distill]` section): CLIP's contrastive
    /// loss, or the Q-Former's ITC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSpec>,
}

/// ALBEF's momentum distillation (Li et al. 2021, §3.3; `configs/Pretrain.yaml`): an
/// exponential-moving-average copy of the towers and projections gives soft targets, and queues
/// of its features are extra negatives (`objectives::distill`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// EMA factor of the momentum copy, updated after every optimiser step (ALBEF: 0.995).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Weight of the momentum model's soft targets against the hard labels (ALBEF: 0.4).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Steps over which alpha ramps up from 0 (ALBEF: the first epoch); 0 = no ramp.
    #[serde(default)]
    pub alpha_warmup_steps: u64,
    /// Momentum features kept as extra negatives, a multiple of the global batch
    /// (batch_size × accum_steps; ALBEF: 65536 at batch 512).
    pub queue_size: usize,
    /// Hard targets spread over every batch and queue entry of the same image (BLIP); false is
    /// ALBEF's one-hot diagonal. Equal when every image comes with one caption.
    #[serde(default = "yes")]
    pub same_image_targets: bool,
}

fn default_momentum() -> f64 {
    0.995
}
fn default_alpha() -> f64 {
    0.4
}
fn yes() -> bool {
    true
}

/// The most entries a distillation queue may hold (each is a feature row per tower).
pub const MAX_QUEUE: usize = 1 << 20;

/// Fine-tuning a pretrained CLIP, as open_clip's `--pretrained`: the model directory's
/// architecture, weights, tokenizer and preprocessing are all kept; only the data and the
/// `[train]` section are new.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// A CLIP model directory with both towers: transformers' `CLIPModel` layout (e.g. a
    /// `vlalign train` output) or open_clip's (`open_clip_config.json` +
    /// `open_clip_model.safetensors`, ViT or ModifiedResNet). The trained model is written in
    /// the transformers layout (a ResNet with vlalign's `vision_resnet` key).
    pub model: PathBuf,
}

/// BLIP-2 stage 1 (Li et al. 2023, §3.2): a Q-Former trained with ITC + ITM + ITG on the
/// features of a frozen image encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QformerSpec {
    /// A CLIP model directory whose vision tower is used frozen (e.g. the demo's `runs/demo/model`).
    pub vision_model: String,
    /// Final vision layers left out: 1 takes the penultimate layer's features, as BLIP-2 does
    /// with EVA ViT-g.
    #[serde(default = "one")]
    pub vision_drop_layers: usize,
    /// `"random"` or a BERT model directory (e.g. MiniLM-L6, `tools/fetch_minilm.sh`) to start
    /// the Q-Former from, as BLIP-2 starts from BERT-base; with a BERT, hidden_size, layers,
    /// heads, intermediate_size and activation come from it, and the tokenizer should be its own.
    #[serde(default)]
    pub init: QformerInit,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Layers `i` with `i % cross_attention_frequency == 0` cross-attend to the image.
    pub cross_attention_frequency: usize,
    /// Learned queries (BLIP-2: 32).
    pub num_query_tokens: usize,
    /// Width of the ITC space (BLIP-2: 256).
    pub embed_dim: usize,
    /// Tokens per caption ([CLS]/[DEC] and [SEP] included).
    pub max_text_len: usize,
    /// `"shapes"` (word-level shapes vocabulary) or a BERT `tokenizer.json`; a [DEC] token is
    /// appended to the vocabulary for ITG either way.
    pub tokenizer: TokenizerSpec,
}

/// BLIP-2 stage 2 (Li et al. 2023, §3.3): the stage-1 Q-Former and a new fully connected
/// projection learn to feed a frozen language model soft visual prompts; the image encoder and
/// the LM stay frozen; the loss is the LM's cross-entropy on the caption tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blip2Spec {
    /// A stage-1 model directory (a `[qformer]` run's `model/`): its frozen image encoder, its
    /// queries and Q-Former layers (trained further), its image preprocessing.
    pub qformer: String,
    /// The frozen LM: a transformers causal-LM directory (config.json, model.safetensors,
    /// tokenizer.json; OPT, Llama, Qwen2) or a llama.cpp `.gguf` file (e.g. SmolLM2-135M from
    /// `tools/fetch_smollm2.sh`). The trained directory refers to it rather than copying it.
    pub language_model: String,
    /// Text before every caption, not a target (LAVIS: "a photo of"); "" for none.
    #[serde(default)]
    pub prompt: String,
    /// Most tokens of prompt + caption + end token (longer texts are cut, keeping the end token).
    pub max_text_len: usize,
    /// Start the projection at the LM's input scale: its weights and bias are scaled so that
    /// unit-variance query outputs map to soft prompts with the token embeddings' RMS (PyTorch's
    /// default initialisation makes them several times larger than SmolLM2's embeddings; on the
    /// demo, 200 steps reach loss 1.54 with it and 2.17 without).
    #[serde(default = "yes")]
    pub projection_init_to_embedding_scale: bool,
}

/// Where the Q-Former's weights start: `"random"`, or any other string, a BERT model directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum QformerInit {
    #[default]
    Random,
    Bert(PathBuf),
}

impl From<String> for QformerInit {
    fn from(s: String) -> Self {
        match s.as_str() {
            "random" => QformerInit::Random,
            _ => QformerInit::Bert(PathBuf::from(s)),
        }
    }
}

impl From<QformerInit> for String {
    fn from(i: QformerInit) -> Self {
        match i {
            QformerInit::Random => "random".into(),
            QformerInit::Bert(p) => p.to_string_lossy().into_owned(),
        }
    }
}

/// The tokenizer a model trains with: `"shapes"` (word-level over the shapes vocabulary),
/// `"clip"` (the bundled OpenAI CLIP BPE), or any other string, a path to a `tokenizer.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TokenizerSpec {
    Shapes,
    Clip,
    File(PathBuf),
}

impl From<String> for TokenizerSpec {
    fn from(s: String) -> Self {
        match s.as_str() {
            "shapes" => TokenizerSpec::Shapes,
            "clip" => TokenizerSpec::Clip,
            _ => TokenizerSpec::File(PathBuf::from(s)),
        }
    }
}

impl From<TokenizerSpec> for String {
    fn from(t: TokenizerSpec) -> Self {
        match t {
            TokenizerSpec::Shapes => "shapes".into(),
            TokenizerSpec::Clip => "clip".into(),
            TokenizerSpec::File(p) => p.to_string_lossy().into_owned(),
        }
    }
}

/// Training-time image augmentation (`data.augment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentKind {
    /// The deterministic eval preprocessing.
    #[default]
    None,
    /// torchvision's RandomResizedCrop with `data.crop_scale`, as open_clip trains.
    RandomResizedCrop,
}

/// A CLIP architecture (converted to HF's `CLIPConfig` once the tokenizer is known).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub image_size: usize,
    /// ViT only (0 = unset, as for a ResNet).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patch_size: usize,
    /// ViT hidden size, or the ResNet's stem and first-stage width.
    pub vision_width: usize,
    /// ViT only.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vision_layers: usize,
    /// ViT attention heads, or the ResNet's attention-pooling heads (over `32 · vision_width`
    /// channels).
    pub vision_heads: usize,
    /// ViT only.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vision_mlp: usize,
    /// A ModifiedResNet image tower (CLIP §2.4) with these bottleneck blocks per stage, instead
    /// of the ViT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnet_layers: Option<[usize; 4]>,
    pub text_width: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_mlp: usize,
    pub context_length: usize,
    pub projection_dim: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// `"shapes"` (word-level over the shapes vocabulary), `"clip"` (the bundled OpenAI BPE),
    /// or a path to a tokenizer.json.
    pub tokenizer: TokenizerSpec,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn default_act() -> Activation {
    Activation::QuickGelu
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `"shapes"`, a manifest (`.jsonl`, `.csv`, `.tsv`) or WebDataset shards (`x-{000..009}.tar`).
    pub source: String,
    #[serde(default = "default_workers")]
    pub workers: usize,
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// `"none"` or `"random_resized_crop"`.
    #[serde(default)]
    pub augment: AugmentKind,
    #[serde(default = "default_crop_scale")]
    pub crop_scale: [f32; 2],
    #[serde(default = "default_buffer")]
    pub shuffle_buffer: usize,
    #[serde(default = "one")]
    pub shapes_min_objects: usize,
    #[serde(default = "three")]
    pub shapes_max_objects: usize,
    /// Shapes samples come in pairs differing only in shape (in-batch hard negatives).
    #[serde(default)]
    pub shapes_twins: bool,
    /// Relative frequency of each object count, shapes_min_objects..=shapes_max_objects
    /// (empty: uniform).
    #[serde(default)]
    pub shapes_object_weights: Vec<f32>,
    /// Fraction of shapes training pairs given another scene's caption (noisy web data; see
    /// `data::shapes::ShapesConfig::caption_noise`). Evaluation data stays clean.
    #[serde(default)]
    pub shapes_caption_noise: f32,
}

fn default_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    2
}
fn default_crop_scale() -> [f32; 2] {
    [0.9, 1.0]
}
fn default_buffer() -> usize {
    1000
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub steps: u64,
    pub batch_size: usize,
    #[serde(default = "one")]
    pub accum_steps: usize,
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    #[serde(default = "beta1")]
    pub beta1: f64,
    #[serde(default = "beta2")]
    pub beta2: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables it.
    #[serde(default)]
    pub grad_clip: f64,
    #[serde(default)]
    pub seed: u64,
    /// `"infonce"` (CLIP) or `"siglip"`.
    #[serde(default)]
    pub loss: ContrastiveLoss,
    pub checkpoint_every: u64,
    #[serde(default = "two")]
    pub keep_checkpoints: usize,
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Variables whose names start with one of these prefixes are not updated during the
    /// first `freeze_steps` steps (e.g. `["text_model", "text_projection"]`: LiT-style locked
    /// text tower while the image tower learns to match its random but distinct embeddings).
    #[serde(default)]
    pub freeze_prefixes: Vec<String>,
    #[serde(default)]
    pub freeze_steps: u64,
    /// `"f32"` (default) or `"bf16"`: mixed precision, for CLIP training (`[model]` with a ViT
    /// image tower, or `[finetune]`) and BLIP-2 stages 1 and 2 (`[qformer]`, `[blip2]`). See
    /// [`Precision`].
    #[serde(default)]
    pub precision: Precision,
    /// Gradient checkpointing (open_clip's `--grad-checkpointing`): each encoder layer keeps
    /// only its input for the backward pass and runs again there — one more forward per step
    /// for activation memory that no longer grows with depth. CLIP training with a ViT image
    /// tower, as `precision`.
    #[serde(default)]
    pub grad_checkpointing: bool,
}

/// The arithmetic of a training step (`train.precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    F32,
    /// Mixed precision, as `torch.autocast(dtype=torch.bfloat16)` does for a transformer: the
    /// encoder layers' matrix products (q/k/v/out projections, attention scores and weighted
    /// values, the MLP) and the MLP's activation in bfloat16; LayerNorm, softmax, the residual
    /// stream, the embeddings, projections, heads and loss in float32; the weights (float32
    /// master copies, cast to bfloat16 where a product uses them: the gradient flows back
    /// through the cast), gradients and AdamW state in float32. The casts sit in
    /// `models::clip::encoder` (CLIP's layers), `models::bert::layers` (the Q-Former's blocks),
    /// `nn::linear` and `nn::attention`. BLIP-2 stage 2's frozen LM is stored in bfloat16
    /// (no master copy: it is not trained) and runs its products in it, its residual stream,
    /// norms, attention softmax and logits in float32 (`models::lm`).
    Bf16,
}

/// The warning a bf16 run on the CPU gives.
pub const BF16_ON_CPU: &str = "train.precision = \"bf16\" on the CPU: candle has no bfloat16 \
     matrix kernels there (each product is widened to float32), so this runs slower than \
     float32; mixed precision pays on CUDA";

impl Precision {
    /// The float type of the encoders' products.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Warns ([`BF16_ON_CPU`]) when mixed precision is asked for on the CPU, where it is slower.
    pub fn warn_if_cpu(self, device: &candle_core::Device) {
        if self != Precision::F32 && device.is_cpu() {
            tracing::warn!("{BF16_ON_CPU}");
        }
    }
}

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.98
}
fn eps() -> f64 {
    1e-6
}
fn two() -> usize {
    2
}
fn ten() -> u64 {
    10
}

/// Bounds on the config values that size an allocation: far above any model this project
/// trains (ViT-g is 1408 wide, 40 layers), far below what would exhaust memory by accident.
const MAX_IMAGE_SIZE: usize = 4096;
const MAX_WIDTH: usize = 16384;
const MAX_LAYERS: usize = 256;
const MAX_TOKENS: usize = 4096;
const MAX_BATCH: usize = 65536;
const MAX_ACCUM: usize = 4096;
const MAX_WORKERS: usize = 256;
const MAX_PREFETCH: usize = 64;
const MAX_SHUFFLE: usize = 1 << 20;
const MAX_STEPS: u64 = 1 << 40;

/// `{section}.{key}` must be in `1..=max`.
fn in_range(section: &str, key: &str, v: usize, max: usize) -> std::result::Result<(), String> {
    if v == 0 || v > max {
        return Err(format!("{section}.{key} ({v}) must be between 1 and {max}"));
    }
    Ok(())
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::io::read_to_string(path)?;
        Self::from_toml(&text).map_err(|m| Error::config(path, m))
    }

    pub fn from_toml(text: &str) -> std::result::Result<Self, String> {
        let cfg: TrainConfig =
            toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// `--steps N`: trains `N` steps, with the warm-up cut to at most a fifth of them so that a
    /// short run still reaches its full learning rate.
    pub fn set_steps(&mut self, steps: u64) -> std::result::Result<(), String> {
        if steps == 0 || steps > MAX_STEPS {
            return Err(format!("--steps {steps}: use 1 to {MAX_STEPS}"));
        }
        self.train.steps = steps;
        self.train.warmup_steps = self.train.warmup_steps.min(steps / 5);
        Ok(())
    }

    /// The CLIP section, for CLIP tasks.
    pub fn clip(&self) -> std::result::Result<&ModelSpec, String> {
        self.model
            .as_ref()
            .ok_or_else(|| "this config has no [model] section (a CLIP built from its keys)".into())
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let (d, t) = (&self.data, &self.train);
        let given = [
            self.model.is_some(),
            self.qformer.is_some(),
            self.finetune.is_some(),
            self.blip2.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => {
                return Err(
                    "missing [model] (a CLIP to train), [finetune] (a CLIP model \
                            directory to fine-tune), [qformer] (a BLIP-2 Q-Former) or [blip2] \
                            (BLIP-2 stage 2)"
                        .into(),
                )
            }
            1 => {}
            _ => {
                return Err(
                    "give one of [model] (a CLIP), [finetune] (a CLIP directory), \
                            [qformer] (a BLIP-2 Q-Former) and [blip2] (stage 2), not several"
                        .into(),
                )
            }
        }
        if let Some(m) = &self.model {
            Self::validate_clip(m)?;
        }
        if let Some(q) = &self.qformer {
            Self::validate_qformer(q)?;
        }
        if let Some(b) = &self.blip2 {
            if !(4..=512).contains(&b.max_text_len) {
                return Err(format!(
                    "blip2.max_text_len ({}) must be between 4 and 512",
                    b.max_text_len
                ));
            }
            if self.distill.is_some() {
                return Err("[distill] applies to contrastive objectives, not to [blip2]".into());
            }
        }
        let resnet = self
            .model
            .as_ref()
            .is_some_and(|m| m.resnet_layers.is_some());
        let vit_clip = (self.model.is_some() || self.finetune.is_some()) && !resnet;
        if t.precision != Precision::F32
            && !(vit_clip || self.qformer.is_some() || self.blip2.is_some())
        {
            return Err(
                "train.precision = \"bf16\" is for CLIP training with a ViT image tower \
                 ([model] or [finetune]) and BLIP-2 ([qformer], [blip2]); the ResNet tower \
                 trains in float32 (leave train.precision out or set it to \"f32\")"
                    .into(),
            );
        }
        if t.grad_checkpointing && !vit_clip {
            return Err(
                "train.grad_checkpointing is for CLIP training with a ViT image tower ([model] \
                 or [finetune]); the Q-Former, stage 2 and the ResNet tower keep their \
                 activations (leave it out or set it to false)"
                    .into(),
            );
        }
        if let Some(k) = &self.distill {
            if self.qformer.is_none() && t.loss != ContrastiveLoss::InfoNce {
                return Err(
                    "[distill] needs train.loss = \"infonce\": its soft targets are softmax \
                     distributions (ALBEF), which the sigmoid loss has no counterpart of"
                        .into(),
                );
            }
            Self::validate_distill(k, t)?;
        }
        Self::validate_data_train(d, t)
    }

    fn validate_distill(k: &DistillSpec, t: &TrainSpec) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&k.momentum) {
            return Err(format!(
                "distill.momentum ({}) must be in [0, 1)",
                k.momentum
            ));
        }
        if !(0.0..=1.0).contains(&k.alpha) {
            return Err(format!("distill.alpha ({}) must be in [0, 1]", k.alpha));
        }
        if k.alpha_warmup_steps > MAX_STEPS {
            return Err(format!(
                "distill.alpha_warmup_steps must be at most {MAX_STEPS}"
            ));
        }
        let global = t.batch_size.saturating_mul(t.accum_steps);
        if k.queue_size > MAX_QUEUE || global == 0 || !k.queue_size.is_multiple_of(global) {
            return Err(format!(
                "distill.queue_size ({}) must be a multiple of the global batch (batch_size × \
                 accum_steps = {global}) and at most {MAX_QUEUE}; 0 is no queue",
                k.queue_size
            ));
        }
        Ok(())
    }

    fn validate_clip(m: &ModelSpec) -> std::result::Result<(), String> {
        if m.resnet_layers.is_some() {
            return Self::validate_resnet_clip(m);
        }
        for (key, v, max) in [
            ("vision_layers", m.vision_layers, MAX_LAYERS),
            ("vision_mlp", m.vision_mlp, 4 * MAX_WIDTH),
        ] {
            in_range("model", key, v, max)?;
        }
        Self::validate_clip_common(m)?;
        if m.patch_size == 0 || !m.image_size.is_multiple_of(m.patch_size) {
            return Err(format!(
                "model.image_size ({}) must be a multiple of model.patch_size ({})",
                m.image_size, m.patch_size
            ));
        }
        if !m.vision_width.is_multiple_of(m.vision_heads) {
            return Err(format!(
                "model.vision_width ({}) must be a multiple of model.vision_heads ({})",
                m.vision_width, m.vision_heads
            ));
        }
        if m.image_size / m.patch_size > 256 {
            return Err(format!(
                "model.image_size / patch_size = {} patches a side; at most 256",
                m.image_size / m.patch_size
            ));
        }
        Self::validate_as_written(m)
    }

    /// A ResNet image tower: the ViT keys are not used, so they must not be given.
    fn validate_resnet_clip(m: &ModelSpec) -> std::result::Result<(), String> {
        for (key, v) in [
            ("patch_size", m.patch_size),
            ("vision_layers", m.vision_layers),
            ("vision_mlp", m.vision_mlp),
        ] {
            if v != 0 {
                return Err(format!(
                    "model.{key} is a ViT key; a ResNet image tower (model.resnet_layers) does not use it"
                ));
            }
        }
        Self::validate_clip_common(m)?;
        Self::validate_as_written(m)
    }

    /// The same rules as loading the model directory this config will write.
    fn validate_as_written(m: &ModelSpec) -> std::result::Result<(), String> {
        m.clip_config(2, 0, 1, 0)
            .validate()
            .map_err(|e| format!("[model] gives an invalid CLIP: {e}"))
    }

    /// The keys both image towers share, and the text tower.
    fn validate_clip_common(m: &ModelSpec) -> std::result::Result<(), String> {
        for (key, v, max) in [
            ("image_size", m.image_size, MAX_IMAGE_SIZE),
            ("vision_width", m.vision_width, MAX_WIDTH),
            ("vision_heads", m.vision_heads, MAX_WIDTH),
            ("text_width", m.text_width, MAX_WIDTH),
            ("text_layers", m.text_layers, MAX_LAYERS),
            ("text_heads", m.text_heads, MAX_WIDTH),
            ("text_mlp", m.text_mlp, 4 * MAX_WIDTH),
            ("context_length", m.context_length, MAX_TOKENS),
            ("projection_dim", m.projection_dim, MAX_WIDTH),
        ] {
            in_range("model", key, v, max)?;
        }
        if !m.text_width.is_multiple_of(m.text_heads) {
            return Err(format!(
                "model.text_width ({}) must be a multiple of model.text_heads ({})",
                m.text_width, m.text_heads
            ));
        }
        if m.context_length < 2 {
            return Err("model.context_length must be at least 2 (start and end of text)".into());
        }
        Ok(())
    }

    fn validate_qformer(q: &QformerSpec) -> std::result::Result<(), String> {
        for (key, v, max) in [
            ("hidden_size", q.hidden_size, MAX_WIDTH),
            ("num_hidden_layers", q.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", q.num_attention_heads, MAX_WIDTH),
            ("intermediate_size", q.intermediate_size, 4 * MAX_WIDTH),
            (
                "cross_attention_frequency",
                q.cross_attention_frequency,
                MAX_LAYERS,
            ),
            ("num_query_tokens", q.num_query_tokens, MAX_TOKENS),
            ("embed_dim", q.embed_dim, MAX_WIDTH),
            ("max_text_len", q.max_text_len, MAX_TOKENS),
        ] {
            in_range("qformer", key, v, max)?;
        }
        if !q.hidden_size.is_multiple_of(q.num_attention_heads) {
            return Err(format!(
                "qformer.hidden_size ({}) must be a multiple of qformer.num_attention_heads ({})",
                q.hidden_size, q.num_attention_heads
            ));
        }
        if q.max_text_len < 3 {
            return Err("qformer.max_text_len must be at least 3".into());
        }
        if q.vision_drop_layers > MAX_LAYERS {
            return Err(format!(
                "qformer.vision_drop_layers ({}) is larger than any tower",
                q.vision_drop_layers
            ));
        }
        Ok(())
    }

    fn validate_data_train(d: &DataSpec, t: &TrainSpec) -> std::result::Result<(), String> {
        for (key, v, max) in [
            ("data.workers", d.workers, MAX_WORKERS),
            ("data.prefetch", d.prefetch, MAX_PREFETCH),
            ("data.shuffle_buffer", d.shuffle_buffer, MAX_SHUFFLE),
            ("train.batch_size", t.batch_size, MAX_BATCH),
            ("train.accum_steps", t.accum_steps, MAX_ACCUM),
            ("train.keep_checkpoints", t.keep_checkpoints, 1 << 20),
        ] {
            let (section, key) = key.split_once('.').expect("dotted key");
            in_range(section, key, v, max)?;
        }
        if t.steps > MAX_STEPS || t.checkpoint_every > MAX_STEPS || t.log_every > MAX_STEPS {
            return Err(format!(
                "train.steps, checkpoint_every and log_every must be at most {MAX_STEPS}"
            ));
        }
        if !(0.0 < d.crop_scale[0] && d.crop_scale[0] <= d.crop_scale[1] && d.crop_scale[1] <= 1.0)
        {
            return Err(format!(
                "data.crop_scale {:?} must satisfy 0 < lo <= hi <= 1",
                d.crop_scale
            ));
        }
        if d.shapes_min_objects == 0
            || d.shapes_min_objects > d.shapes_max_objects
            || d.shapes_max_objects > 5
        {
            return Err(
                "data.shapes_min_objects/shapes_max_objects must satisfy 1 <= min <= max <= 5"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&d.shapes_caption_noise) {
            return Err(format!(
                "data.shapes_caption_noise {} must be between 0 and 1",
                d.shapes_caption_noise
            ));
        }
        let counts = d.shapes_max_objects - d.shapes_min_objects + 1;
        let sum: f32 = d.shapes_object_weights.iter().sum();
        if !d.shapes_object_weights.is_empty()
            && (d.shapes_object_weights.len() != counts
                || d.shapes_object_weights
                    .iter()
                    .any(|&w| !w.is_finite() || w < 0.0)
                || !sum.is_finite()
                || sum <= 0.0)
        {
            return Err(format!(
                "data.shapes_object_weights needs {counts} non-negative weights (one per object count), not all zero"
            ));
        }
        if t.batch_size < 2 {
            return Err(
                "train.batch_size must be at least 2 (contrastive losses need negatives)".into(),
            );
        }
        if t.steps == 0 || t.accum_steps == 0 || t.checkpoint_every == 0 || t.log_every == 0 {
            return Err(
                "train.steps, accum_steps, checkpoint_every and log_every must be positive".into(),
            );
        }
        // Written so that NaN fails every check (a comparison with NaN is false).
        if !(t.lr > 0.0 && t.lr <= 1.0) {
            return Err(format!("train.lr ({}) must be in (0, 1]", t.lr));
        }
        if !(t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return Err(format!(
                "train.min_lr ({}) must be between 0 and train.lr ({})",
                t.min_lr, t.lr
            ));
        }
        for (key, v) in [("beta1", t.beta1), ("beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("train.{key} ({v}) must be in [0, 1)"));
            }
        }
        if !(t.eps > 0.0 && t.eps.is_finite()) {
            return Err(format!("train.eps ({}) must be positive", t.eps));
        }
        for (key, v) in [("weight_decay", t.weight_decay), ("grad_clip", t.grad_clip)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("train.{key} ({v}) must be finite and not negative"));
            }
        }
        Ok(())
    }
}

impl ModelSpec {
    /// HF `CLIPConfig` for a tokenizer of `vocab_size` with the given special ids.
    pub fn clip_config(&self, vocab_size: usize, bos: u32, eos: u32, pad: u32) -> ClipConfig {
        ClipConfig {
            text_config: ClipTextConfig {
                vocab_size,
                hidden_size: self.text_width,
                intermediate_size: self.text_mlp,
                projection_dim: self.projection_dim,
                num_hidden_layers: self.text_layers,
                num_attention_heads: self.text_heads,
                max_position_embeddings: self.context_length,
                hidden_act: self.hidden_act,
                layer_norm_eps: 1e-5,
                pad_token_id: pad,
                bos_token_id: bos,
                eos_token_id: eos,
            },
            vision_config: match self.resnet_layers {
                // Unused beside a ResNet but for the image size the pipeline reads.
                Some(_) => ClipVisionConfig {
                    image_size: self.image_size,
                    projection_dim: self.projection_dim,
                    ..ClipVisionConfig::default()
                },
                None => self.vit_config(),
            },
            projection_dim: self.projection_dim,
            logit_scale_init_value: crate::objectives::contrastive::CLIP_LOGIT_SCALE_INIT,
            vision_resnet: self.resnet_layers.map(|layers| ResNetConfig {
                layers,
                width: self.vision_width,
                heads: self.vision_heads,
                image_size: self.image_size,
                output_dim: self.projection_dim,
            }),
        }
    }

    fn vit_config(&self) -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: self.vision_width,
            intermediate_size: self.vision_mlp,
            projection_dim: self.projection_dim,
            num_hidden_layers: self.vision_layers,
            num_attention_heads: self.vision_heads,
            num_channels: 3,
            image_size: self.image_size,
            patch_size: self.patch_size,
            hidden_act: self.hidden_act,
            layer_norm_eps: 1e-5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"
[model]
image_size = 32
patch_size = 8
vision_width = 64
vision_layers = 2
vision_heads = 4
vision_mlp = 128
text_width = 64
text_layers = 2
text_heads = 4
text_mlp = 128
context_length = 24
projection_dim = 32
tokenizer = "shapes"
[data]
source = "shapes"
[train]
steps = 10
batch_size = 8
lr = 1e-3
warmup_steps = 2
weight_decay = 0.1
checkpoint_every = 5
"#;

    #[test]
    fn parses_with_defaults() {
        let c = TrainConfig::from_toml(TINY).unwrap();
        assert_eq!(c.data.workers, 2);
        assert_eq!(c.train.loss, ContrastiveLoss::InfoNce);
        assert_eq!(c.data.augment, AugmentKind::None);
        let again = TrainConfig::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = TrainConfig::from_toml(&TINY.replace("lr = 1e-3", "lr = 1e-3\nlearning_rate = 2"))
            .unwrap_err();
        assert!(e.contains("learning_rate"), "{e}");
        let e =
            TrainConfig::from_toml(&TINY.replace("patch_size = 8", "patch_size = 7")).unwrap_err();
        assert!(
            e.contains("model.image_size (32) must be a multiple of model.patch_size (7)"),
            "{e}"
        );
        let e = TrainConfig::from_toml(&TINY.replace("batch_size = 8", "batch_size = \"big\""))
            .unwrap_err();
        assert!(e.contains("batch_size"), "{e}");
        let e = TrainConfig::from_toml(&TINY.replace("[data]\nsource = \"shapes\"", "[data]"))
            .unwrap_err();
        assert!(e.contains("source"), "{e}");
        // Optimiser values are finite and in range (NaN included).
        for (key, bad) in [
            ("lr = 1e-3", "lr = nan"),
            ("lr = 1e-3", "lr = inf"),
            ("lr = 1e-3", "lr = 1e9"),
            ("lr = 1e-3", "lr = 1e-3\nmin_lr = nan"),
            ("lr = 1e-3", "lr = 1e-3\nbeta1 = 1.0"),
            ("lr = 1e-3", "lr = 1e-3\nbeta2 = -0.1"),
            ("lr = 1e-3", "lr = 1e-3\neps = 0.0"),
            ("weight_decay = 0.1", "weight_decay = nan"),
            ("lr = 1e-3", "lr = 1e-3\ngrad_clip = inf"),
        ] {
            let e = TrainConfig::from_toml(&TINY.replace(key, bad)).unwrap_err();
            let name = bad.rsplit('\n').next().unwrap().split(' ').next().unwrap();
            assert!(e.contains(&format!("train.{name}")), "{bad}: {e}");
        }
        // Sizes that would panic or exhaust memory are refused by name.
        for (key, bad, named) in [
            ("text_width = 64", "text_width = 0", "model.text_width (0)"),
            (
                "vision_layers = 2",
                "vision_layers = 0",
                "model.vision_layers (0)",
            ),
            (
                "image_size = 32",
                "image_size = 65536",
                "model.image_size (65536)",
            ),
            (
                "batch_size = 8",
                "batch_size = 1000000000",
                "train.batch_size",
            ),
            (
                "lr = 1e-3",
                "lr = 1e-3\naccum_steps = 1000000000000000000",
                "train.accum_steps",
            ),
            (
                "source = \"shapes\"",
                "source = \"shapes\"\nworkers = 1000000",
                "data.workers",
            ),
            (
                "source = \"shapes\"",
                "source = \"shapes\"\nprefetch = 1000000000000",
                "data.prefetch",
            ),
            (
                "source = \"shapes\"",
                "source = \"shapes\"\nshapes_object_weights = [inf, 1, 1]",
                "shapes_object_weights",
            ),
            (
                "source = \"shapes\"",
                "source = \"shapes\"\nshapes_object_weights = [3e38, 3e38, 1]",
                "shapes_object_weights",
            ),
        ] {
            let e = TrainConfig::from_toml(&TINY.replace(key, bad)).unwrap_err();
            assert!(e.contains(named), "{bad}: {e}");
        }
        let mut c = TrainConfig::from_toml(TINY).unwrap();
        assert!(c.set_steps(0).unwrap_err().contains("--steps 0"));
        c.set_steps(50).unwrap();
        assert_eq!((c.train.steps, c.train.warmup_steps), (50, 2));
        // Choices are enums: a bad value names the accepted ones.
        let e = TrainConfig::from_toml(&TINY.replace("lr = 1e-3", "lr = 1e-3\nloss = \"triplet\""))
            .unwrap_err();
        assert!(
            e.contains("triplet") && e.contains("infonce") && e.contains("siglip"),
            "{e}"
        );
        let e = TrainConfig::from_toml(&TINY.replace(
            "source = \"shapes\"",
            "source = \"shapes\"\naugment = \"flip\"",
        ))
        .unwrap_err();
        assert!(
            e.contains("flip") && e.contains("random_resized_crop"),
            "{e}"
        );
    }
}
