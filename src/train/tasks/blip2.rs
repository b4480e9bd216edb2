//! BLIP-2 stage 2 as a training task (Li et al. 2023, §3.3, Fig. 3; LAVIS blip2_opt.py
//! `forward`): images → the frozen image encoder → the Q-Former (started from a stage-1
//! directory) → `language_projection` → soft visual prompts in front of `prompt + caption + end`
//! → the frozen LM; the loss is the LM's cross-entropy on the caption and end tokens
//! (`objectives::lm`). Only the queries, the Q-Former layers and the projection learn: the image
//! encoder is a set of frozen tensors and the LM holds plain tensors, never variables, though
//! the gradient flows through it to the prompts.
//!
//! The trained directory is a `Blip2ForConditionalGeneration` in the legacy layout (no `<image>`
//! token: the LM's vocabulary is left as it is) whose `vlalign_language_model` names the LM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::data::batch::Batch;
use crate::data::image::{processor_for_dir, ImageProcessor};
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::models::blip2::{Blip2Lm, Blip2LmConfig, QUERY_SLOT};
use crate::models::lm::gguf::{self, Gguf};
use crate::models::lm::CausalLm;
use crate::models::ModelDir;
use crate::objectives::lm::{caption_targets, token_cross_entropy_sum};
use crate::train::config::{Blip2Spec, TrainConfig};
use crate::train::optim::{add_grads, Grads};
use crate::train::shards::SHARDS;
use crate::train::task::{LossTerms, Task, TaskParts};

pub struct Blip2Task {
    pub parts: TaskParts,
    pub model: Blip2Lm,
    pub config: Blip2LmConfig,
    /// `prompt` tokenised as the LM's tokenizer writes it (with its BOS, if it adds one).
    prompt_ids: Vec<u32>,
    prompt: String,
    /// The token that ends every caption (the LM's eos).
    end_id: u32,
    max_text_len: usize,
}

/// The stage-1 tensors stage 2 keeps training: the queries and the Q-Former's query path (its
/// text feed-forward, text embeddings and ITC/ITM/ITG heads have no part in stage 2).
pub fn stage2_keeps(name: &str) -> bool {
    if name == "query_tokens" || name.starts_with("qformer.layernorm.") {
        return true;
    }
    // qformer.encoder.layer.{i}.{part}.…: every part but the text feed-forward
    // (`intermediate`, `output`; the queries' own are `intermediate_query`, `output_query`).
    let Some(rest) = name.strip_prefix("qformer.encoder.layer.") else {
        return false;
    };
    let part = rest.split('.').nth(1).unwrap_or("");
    part != "intermediate" && part != "output"
}

/// The LM's tokenizer: `tokenizer.json` beside a transformers LM, rebuilt from a GGUF's metadata.
fn lm_tokenizer(path: &Path, context: usize) -> Result<TextTokenizer> {
    match gguf::find(path)? {
        Some(file) => {
            let json = Gguf::open(&file)?.tokenizer_json()?;
            TextTokenizer::from_json_bytes(json.to_string().as_bytes(), &file, context)
        }
        None => TextTokenizer::from_file(&path.join("tokenizer.json"), context),
    }
}

impl Blip2Task {
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Self> {
        let spec: &Blip2Spec = cfg
            .blip2
            .as_ref()
            .ok_or_else(|| Error::input("the config has no [blip2] section"))?;
        let stage1 = Path::new(&spec.qformer);
        let md = ModelDir::open(stage1)?;
        let mut blip2 = md
            .qformer("blip2.qformer (a stage-1 Q-Former directory)")?
            .clone();
        blip2.qformer.use_qformer_text_input = false;
        let lm_path = PathBuf::from(&spec.language_model);
        if !lm_path.exists() {
            return Err(Error::input(format!(
                "blip2.language_model {:?} does not exist (a causal-LM directory or a .gguf file; \
                 `bash tools/fetch_smollm2.sh` fetches SmolLM2-135M)",
                spec.language_model
            )));
        }
        let lm_path = lm_path.canonicalize().map_err(|e| Error::io(&lm_path, e))?;
        // Mixed precision: the frozen LM stored in bfloat16 (half its memory) with its products
        // in bfloat16; the Q-Former's blocks compute in bfloat16 over float32 master weights.
        let compute = cfg.train.precision.compute_dtype();
        cfg.train.precision.warn_if_cpu(device);
        let (lm, text) = CausalLm::load_as(&lm_path, compute, device)?;
        let tokenizer = lm_tokenizer(&lm_path, spec.max_text_len)?;
        let end_id = *text.eos_token_ids().first().ok_or_else(|| {
            Error::input(format!(
                "{}: the language model names no eos_token_id to end captions with",
                lm_path.display()
            ))
        })?;
        let config = Blip2LmConfig {
            blip2,
            text,
            image_token_index: None,
            language_model: Some(lm_path.to_string_lossy().into_owned()),
        };

        let stored = Weights::open(stage1)?.all(DType::F32, device)?;
        let frozen: HashMap<String, Tensor> = stored
            .iter()
            .filter(|(k, _)| k.starts_with("vision_model."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let initial: HashMap<String, Tensor> = stored
            .into_iter()
            .filter(|(k, _)| stage2_keeps(k))
            .collect();
        let varmap = VarMap::new();
        let vb = crate::nn::init::seeded_with(
            &varmap,
            cfg.train.seed,
            frozen.clone(),
            initial,
            DType::F32,
            device,
        );
        // The frozen tower stays in `frozen` too, to be saved with the model (the LM, loaded
        // above and held only by the model, is laid out for inference).
        let mut model = crate::nn::linear::keeping_layout(|| Blip2Lm::new(vb, &config, Some(lm)))?;
        if compute != DType::F32 {
            model.qformer.set_compute(compute);
        }
        let processor = match processor_for_dir(stage1)? {
            Some((p, _)) => p,
            None => ImageProcessor::clip_default(config.blip2.vision.image_size()),
        };
        let mut task = Self {
            parts: TaskParts {
                varmap,
                frozen,
                processor,
                tokenizer,
                extra_files: Vec::new(),
                device: device.clone(),
                comm: crate::dist::single(),
            },
            model,
            config,
            prompt_ids: Vec::new(),
            prompt: spec.prompt.clone(),
            end_id,
            max_text_len: spec.max_text_len,
        };
        if spec.projection_init_to_embedding_scale {
            // nn.Linear's U(±1/√in) has std 1/√(3·in): outputs of unit-variance inputs have
            // std 1/√3; scale them to the embeddings' RMS.
            let factor = (task.model.lm.embedding_rms()? as f64) * 3f64.sqrt();
            for name in ["language_projection.weight", "language_projection.bias"] {
                let v = task.parts.var(name).expect("the projection is a variable");
                v.set(&(v.as_tensor() * factor)?)?;
            }
        }
        task.prompt_ids = task.tokenise(&spec.prompt)?;
        if task.prompt_ids.len() + 2 > spec.max_text_len {
            return Err(Error::input(format!(
                "blip2.prompt takes {} tokens: blip2.max_text_len ({}) leaves no room for a caption",
                task.prompt_ids.len(),
                spec.max_text_len
            )));
        }
        Ok(task)
    }

    /// Token ids of `text` with the tokenizer's own special tokens (its BOS, if it adds one).
    fn tokenise(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.parts.tokenizer.encode(&[text])?;
        let len = enc.batch.mask[0].iter().filter(|&&m| m == 1).count();
        Ok(enc.batch.ids[0][..len].to_vec())
    }

    /// The text of one caption: `prompt + " " + caption` tokenised together (as LAVIS joins the
    /// prompt and the caption into one string), cut to `max_text_len − 1`, then the end token. A
    /// caption that already begins with the prompt as whole words ("a photo of a red star" under
    /// "a photo of") is taken as it is: doubled, it would teach the LM to repeat the prompt.
    fn text_ids(&self, caption: &str) -> Result<Vec<u32>> {
        let joined = if self.prompt.is_empty() || starts_with_words(caption, &self.prompt) {
            caption.to_string()
        } else {
            format!("{} {}", self.prompt, caption)
        };
        let mut ids = self.tokenise(&joined)?;
        ids.truncate(self.max_text_len - 1);
        ids.push(self.end_id);
        Ok(ids)
    }

    /// How many leading tokens of `text` are prompt (never all: the end token is a target).
    fn prompt_len(&self, text: &[u32]) -> usize {
        self.prompt_ids.len().min(text.len() - 1)
    }

    /// The texts of `b`'s captions ([`Blip2Task::text_ids`]).
    fn texts(&self, b: &Batch) -> Result<Vec<Vec<u32>>> {
        b.captions.iter().map(|c| self.text_ids(c)).collect()
    }

    /// The summed caption cross-entropy of `b` and its target count.
    pub fn loss_sum(&self, b: &Batch) -> Result<(Tensor, usize)> {
        self.loss_sum_of(b, &self.texts(b)?)
    }

    /// [`Blip2Task::loss_sum`] of `b` whose captions are already the texts `texts`.
    fn loss_sum_of(&self, b: &Batch, texts: &[Vec<u32>]) -> Result<(Tensor, usize)> {
        let device = &self.parts.device;
        let prefix = self.model.image_prefix(&b.pixel_tensor(device)?)?;
        let q = self.model.num_queries();
        let longest = texts.iter().map(Vec::len).max().unwrap_or(0);
        let pad = self.parts.tokenizer.pad_id();
        let (mut rows, mut mask) = (Vec::new(), Vec::new());
        let (mut at, mut targets) = (Vec::new(), Vec::new());
        for (r, t) in texts.iter().enumerate() {
            // [queries; text; padding on the right].
            let mut row = vec![QUERY_SLOT; q];
            row.extend_from_slice(t);
            row.resize(q + longest, pad);
            let mut m = vec![1u32; q + t.len()];
            m.resize(q + longest, 0);
            rows.push(row);
            mask.push(m);
            for (pos, target) in caption_targets(t, self.prompt_len(t)) {
                at.push((r * (q + longest) + q + pos.map_or(0, |p| p + 1) - 1) as u32);
                targets.push(target);
            }
        }
        let embeds = self.model.inputs_embeds(&prefix, &rows)?;
        let hidden = self
            .model
            .lm
            .forward(&embeds, &mask, &mut self.model.lm.cache())?;
        let (bsz, len, w) = hidden.dims3()?;
        let idx = Tensor::from_vec(at, targets.len(), device)?;
        let picked = hidden.reshape((bsz * len, w))?.index_select(&idx, 0)?;
        let logits = self.model.lm.logits(&picked)?;
        Ok((token_cross_entropy_sum(&logits, &targets)?, targets.len()))
    }

    /// The gradients of one shard's summed loss divided by the step's target count `total`,
    /// and that loss.
    /// The shard's loss stays on the device (float64): the step reads the sum once.
    fn shard_grads(&self, b: &Batch, texts: &[Vec<u32>], total: f64) -> Result<(Grads, Tensor)> {
        let (sum, _) = self.loss_sum_of(b, texts)?;
        let l = (sum / total)?;
        let mut grads = Grads::new();
        self.parts.collect(&l.backward()?, &mut grads)?;
        Ok((grads, l.detach().to_dtype(candle_core::DType::F64)?))
    }
}

impl Task for Blip2Task {
    fn parts(&self) -> &TaskParts {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut TaskParts {
        &mut self.parts
    }

    fn loss_names(&self) -> &'static [&'static str] {
        &["lm"]
    }

    /// Every caption's loss depends on its own pair alone, so ranks need only agree on the
    /// divisor: the target count of the global batch.
    fn data_parallel(&self) -> Result<()> {
        Ok(())
    }

    /// Each micro-batch's summed cross-entropy divided by the step's total target count (over
    /// every rank): the micro-batches' (and ranks') gradients add up to the large batch's mean.
    fn grads(&mut self, micro: &[Batch], _step: u64) -> Result<(Grads, LossTerms)> {
        // Every caption tokenised once: the step's target count first, then the shards' losses.
        let texts: Vec<Vec<Vec<u32>>> =
            micro.iter().map(|b| self.texts(b)).collect::<Result<_>>()?;
        let count: usize = texts
            .iter()
            .flatten()
            .map(|t| caption_targets(t, self.prompt_len(t)).len())
            .sum();
        let count: u64 = crate::dist::all_gather_u64(self.parts.comm.as_ref(), count as u64)?
            .iter()
            .sum();
        let total = count.max(1) as f64;
        let mut grads = Grads::new();
        let mut loss: Option<Tensor> = None;
        let this = &*self;
        for (b, texts) in micro.iter().zip(&texts) {
            // SHARDS fixed row ranges on parallel threads, added in order: the same sums on any
            // core count (as the Q-Former step).
            let n = b.len();
            let shards: Vec<(Batch, &[Vec<u32>])> = (0..SHARDS)
                .map(|k| n * k / SHARDS..n * (k + 1) / SHARDS)
                .filter(|r| !r.is_empty())
                .map(|r| (b.rows(r.clone()), &texts[r]))
                .collect();
            // Each in a pool of its own (train/shards.rs says why).
            let results = crate::train::shards::run("stage-2", &shards, |(s, t)| {
                this.shard_grads(s, t, total)
            })?;
            for res in results {
                let (g, l) = res?;
                add_grads(&mut grads, g)?;
                loss = Some(match loss {
                    Some(s) => (s + l)?,
                    None => l,
                });
            }
        }
        let total = match loss {
            Some(l) => crate::nn::host::f64_of(&l)? as f32,
            None => 0.0,
        };
        Ok((
            grads,
            LossTerms {
                total,
                parts: vec![("lm".into(), total)],
            },
        ))
    }

    fn hf_config(&self) -> serde_json::Value {
        self.config.to_hf_json()
    }
}

/// Whether `text` begins with the words of `prefix` (followed by a space or nothing).
fn starts_with_words(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
}

#[cfg(test)]
mod tests {
    use super::starts_with_words;

    #[test]
    fn a_prompt_is_a_caption_prefix_only_as_whole_words() {
        assert!(starts_with_words("a photo of a red star", "a photo of"));
        assert!(starts_with_words("a photo of", "a photo of"));
        assert!(!starts_with_words("a photo offset", "a photo of"));
        assert!(!starts_with_words("red star", "a photo of"));
    }
}
