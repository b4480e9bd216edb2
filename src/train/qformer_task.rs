//! BLIP-2 stage 1 as a training task (Li et al. 2023, §3.2; LAVIS `blip2_qformer.py`
//! `Blip2Qformer.forward`): a Q-Former learns, on the features of a frozen image encoder, three
//! objectives that share every weight — ITC, ITM with hard negatives drawn from the ITC
//! similarities, ITG — and the loss is their sum, each term logged. The image encoder is the
//! vision tower of a CLIP model directory, cut before its last `vision_drop_layers` layers;
//! `ln_vision` (`vision_model.post_layernorm`) is new and trained, as in LAVIS.

mod step;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::optim::Grads;
use super::task::{LossTerms, Task};
use crate::config::{QformerSpec, TrainConfig};
use crate::data::image::{processor_for_dir, ImageProcessor};
use crate::data::loader::Batch;
use crate::data::shapes::{self, SceneTruth};
use crate::data::text::{word_level_tokenizer_config, TextTokenizer};
use crate::error::{Error, Result};
use crate::model_dir::write_json;
use crate::models::bert::BertConfig;
use crate::models::clip::config::ClipVisionConfig;
use crate::models::qformer::config::{Blip2Config, QformerConfig, VisionConfig};
use crate::models::qformer::Blip2Qformer;
use crate::models::weights::Weights;
use crate::nn::Activation;
use crate::objectives::itc::{itc_loss, max_over_queries, TEMP_INIT, TEMP_MAX, TEMP_MIN};
use crate::objectives::itg::{decoder_ids, itg_loss};
use crate::objectives::itm::{itm_loss, sample_hard_negatives_excluding};

/// The learned ITC temperature's tensor name (LAVIS's; not part of HF's layout).
pub const TEMP: &str = "temp";

pub struct QformerTask {
    pub varmap: VarMap,
    pub model: Blip2Qformer,
    pub config: Blip2Config,
    pub processor: ImageProcessor,
    pub tokenizer: TextTokenizer,
    /// The [DEC] id that replaces [CLS] for ITG.
    pub dec_id: u32,
    /// The frozen image encoder's tensors, written into every model directory.
    frozen: HashMap<String, Tensor>,
    extra_files: Vec<(String, Vec<u8>)>,
    temp: Var,
    seed: u64,
    device: Device,
}

/// The frozen tower: `vision_model.*` of a CLIP directory without its final `drop` layers and
/// without CLIP's own `post_layernorm` (BLIP-2 trains a fresh `ln_vision` in its place).
fn frozen_clip_vision(
    dir: &Path,
    drop: usize,
) -> Result<(ClipVisionConfig, HashMap<String, Tensor>)> {
    let cfg_path = dir.join("config.json");
    let v: serde_json::Value = crate::error::read_json(&cfg_path)?;
    let vcfg = v.get("vision_config").cloned().unwrap_or(v.clone());
    let mut vision: ClipVisionConfig =
        serde_json::from_value(vcfg).map_err(|e| Error::config(&cfg_path, e.to_string()))?;
    if drop >= vision.num_hidden_layers {
        return Err(Error::config(
            &cfg_path,
            format!(
                "the vision tower has {} layers; qformer.vision_drop_layers = {drop} leaves none",
                vision.num_hidden_layers
            ),
        ));
    }
    vision.num_hidden_layers -= drop;
    let w = Weights::open(dir)?;
    let keep = |name: &str| {
        let Some(rest) = name.strip_prefix("vision_model.") else {
            return false;
        };
        if rest.starts_with("post_layernorm") {
            return false;
        }
        match rest.strip_prefix("encoder.layers.") {
            Some(l) => l
                .split('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i < vision.num_hidden_layers),
            None => true,
        }
    };
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    let mut frozen = HashMap::new();
    for name in w.names().into_iter().filter(|n| keep(n)) {
        let t = vb
            .get_unchecked(&name)
            .map_err(|e| Error::weights(dir, e.to_string()))?;
        frozen.insert(name, t);
    }
    if frozen.is_empty() {
        return Err(Error::weights(
            dir,
            "no vision_model.* tensors: qformer.vision_model must be a CLIP model directory",
        ));
    }
    Ok((vision, frozen))
}

/// `(image i, text j) ↦ caption j is true of image i`, for the hard-negative draw: LAVIS keeps
/// pairs that share an `image_id` out of the negatives; shapes knows more — which captions are
/// true of which generated scene (`SceneTruth`), e.g. two "a red circle" images. Samples
/// without a scene (read data) match only their own caption.
fn caption_true_of<'a>(truths: &'a [&'a Option<SceneTruth>]) -> impl Fn(usize, usize) -> bool + 'a {
    move |i, j| match (truths.get(i), truths.get(j)) {
        (Some(Some(image)), Some(Some(text))) => image.caption_fits(text),
        _ => false,
    }
}

/// Starting values from a BERT checkpoint, as LAVIS initialises the Q-Former from BERT-base
/// (blip2.py `init_Qformer`; blip2_qformer.py copies every feed-forward into its `_query` twin):
/// embeddings (word rows beyond BERT's vocabulary, e.g. [DEC], stay random; the first
/// `positions` position rows), the embedding LayerNorm as `qformer.layernorm`, and per layer
/// self-attention, both feed-forwards; cross-attention has no counterpart and stays random. BERT's
/// token-type table is dropped (the Q-Former has none), as in LAVIS.
fn bert_initial(
    dir: &Path,
    vocab: usize,
    positions: usize,
    seed: u64,
) -> Result<(BertConfig, HashMap<String, Tensor>)> {
    let cfg_path = dir.join("config.json");
    let bert: BertConfig = crate::error::read_json(&cfg_path)?;
    bert.validate().map_err(|m| Error::config(&cfg_path, m))?;
    if positions > bert.max_position_embeddings {
        return Err(Error::config(
            &cfg_path,
            format!(
                "qformer.max_text_len ({positions}) exceeds the BERT's max_position_embeddings ({})",
                bert.max_position_embeddings
            ),
        ));
    }
    let w = Weights::open(dir)?;
    let names = w.names();
    let root = if names
        .iter()
        .any(|n| n == "bert.embeddings.word_embeddings.weight")
    {
        "bert."
    } else {
        ""
    };
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    let get = |name: &str| -> Result<Tensor> {
        vb.get_unchecked(&format!("{root}{name}"))
            .map_err(|e| Error::weights(dir, format!("{name}: {e}")))
    };
    let h = bert.hidden_size;
    let mut init = HashMap::new();
    let words = get("embeddings.word_embeddings.weight")?;
    let extra = vocab.saturating_sub(bert.vocab_size);
    let words = if extra > 0 {
        let name = "embeddings.word_embeddings.weight";
        let init_new = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let v = crate::nn::init::seeded_values(&init_new, &(extra, h).into(), seed, name);
        Tensor::cat(
            &[&words, &Tensor::from_vec(v, (extra, h), &Device::Cpu)?],
            0,
        )?
    } else {
        words
    };
    init.insert("embeddings.word_embeddings.weight".to_string(), words);
    init.insert(
        "embeddings.position_embeddings.weight".to_string(),
        get("embeddings.position_embeddings.weight")?.narrow(0, 0, positions)?,
    );
    for p in ["weight", "bias"] {
        init.insert(
            format!("qformer.layernorm.{p}"),
            get(&format!("embeddings.LayerNorm.{p}"))?,
        );
    }
    for i in 0..bert.num_hidden_layers {
        let (src, dst) = (
            format!("encoder.layer.{i}"),
            format!("qformer.encoder.layer.{i}"),
        );
        for p in ["weight", "bias"] {
            let pairs = [
                ("attention.self.query", "attention.attention.query"),
                ("attention.self.key", "attention.attention.key"),
                ("attention.self.value", "attention.attention.value"),
                ("attention.output.dense", "attention.output.dense"),
                ("attention.output.LayerNorm", "attention.output.LayerNorm"),
                ("intermediate.dense", "intermediate.dense"),
                ("output.dense", "output.dense"),
                ("output.LayerNorm", "output.LayerNorm"),
                ("intermediate.dense", "intermediate_query.dense"),
                ("output.dense", "output_query.dense"),
                ("output.LayerNorm", "output_query.LayerNorm"),
            ];
            for (a, b) in pairs {
                init.insert(format!("{dst}.{b}.{p}"), get(&format!("{src}.{a}.{p}"))?);
            }
        }
    }
    Ok((bert, init))
}

impl QformerTask {
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Self> {
        let spec: &QformerSpec = cfg
            .qformer
            .as_ref()
            .ok_or_else(|| Error::input("the config has no [qformer] section"))?;
        if spec.init != "random" && !Path::new(&spec.init).join("config.json").is_file() {
            return Err(Error::input(format!(
                "qformer.init = {:?}: use \"random\" or a BERT model directory (config.json + safetensors)",
                spec.init
            )));
        }
        let dir = Path::new(&spec.vision_model);
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "qformer.vision_model {:?} is not a directory (train the CLIP first, e.g. `vlalign demo`)",
                spec.vision_model
            )));
        }
        let (vision, frozen) = frozen_clip_vision(dir, spec.vision_drop_layers)?;
        let processor = match processor_for_dir(dir)? {
            Some((p, _)) => p,
            None => ImageProcessor::clip_default(vision.image_size),
        };
        let (tokenizer, extra_files) = match spec.tokenizer.as_str() {
            "shapes" => {
                let ctx = spec.max_text_len;
                let tok = TextTokenizer::word_level(&shapes::vocabulary(), ctx)?;
                let tc =
                    serde_json::to_vec_pretty(&word_level_tokenizer_config(ctx)).expect("json");
                (tok, vec![("tokenizer_config.json".to_string(), tc)])
            }
            path => (
                TextTokenizer::from_file(Path::new(path), spec.max_text_len)?,
                Vec::new(),
            ),
        };
        // With a BERT to start from, its shape wins over the spec's; [DEC] is appended after the
        // larger of the two vocabularies (30522 for BERT's WordPiece, as LAVIS).
        let bert_vocab = if spec.init == "random" {
            0
        } else {
            crate::error::read_json::<BertConfig>(Path::new(&spec.init).join("config.json"))?
                .vocab_size
        };
        let vocab = tokenizer.vocab_size().max(bert_vocab) + 1;
        let dec_id = (vocab - 1) as u32;
        let (shape, initial) = if spec.init == "random" {
            let b = BertConfig {
                vocab_size: vocab,
                hidden_size: spec.hidden_size,
                num_hidden_layers: spec.num_hidden_layers,
                num_attention_heads: spec.num_attention_heads,
                intermediate_size: spec.intermediate_size,
                hidden_act: Activation::Gelu,
                layer_norm_eps: 1e-12,
                ..BertConfig::default()
            };
            (b, HashMap::new())
        } else {
            bert_initial(
                Path::new(&spec.init),
                vocab,
                spec.max_text_len,
                cfg.train.seed,
            )?
        };
        let config = Blip2Config {
            vision: VisionConfig::Clip(vision.clone()),
            qformer: QformerConfig {
                vocab_size: vocab,
                hidden_size: shape.hidden_size,
                num_hidden_layers: shape.num_hidden_layers,
                num_attention_heads: shape.num_attention_heads,
                intermediate_size: shape.intermediate_size,
                hidden_act: shape.hidden_act,
                max_position_embeddings: spec.max_text_len,
                layer_norm_eps: shape.layer_norm_eps,
                pad_token_id: tokenizer.pad_id(),
                cross_attention_frequency: spec.cross_attention_frequency,
                encoder_hidden_size: vision.hidden_size,
                use_qformer_text_input: true,
                bos_token_id: Some(dec_id),
            },
            num_query_tokens: spec.num_query_tokens,
            image_text_hidden_size: spec.embed_dim,
        };
        config.validate().map_err(Error::input)?;
        let varmap = VarMap::new();
        let vb = crate::nn::init::seeded_with(
            &varmap,
            cfg.train.seed,
            frozen.clone(),
            initial,
            DType::F32,
            device,
        );
        let model = Blip2Qformer::new(vb.clone(), &config, true)?;
        vb.get_with_hints((), TEMP, candle_nn::Init::Const(TEMP_INIT))?;
        let temp = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .get(TEMP)
            .cloned()
            .expect("temperature created");
        Ok(Self {
            varmap,
            model,
            config,
            processor,
            tokenizer,
            dec_id,
            frozen,
            extra_files,
            temp,
            seed: cfg.train.seed,
            device: device.clone(),
        })
    }

    /// ITM's hard negatives `(text_for_image, image_for_text)` of step `step`: drawn (seeded by
    /// the run's seed and the step) from the softmax of the temperature-scaled ITC similarities
    /// of these features, never a caption true of its image (`truths`, one per pair).
    fn hard_negatives(
        &self,
        img_f: &Tensor,
        txt_f: &Tensor,
        truths: &[&Option<SceneTruth>],
        step: u64,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let sim = max_over_queries(&img_f.detach(), &txt_f.detach())?
            .broadcast_div(&self.temp.as_tensor().detach())?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x17e3_0001);
        rng.set_stream(step);
        Ok(sample_hard_negatives_excluding(
            &sim,
            &caption_true_of(truths),
            &mut rng,
        )?)
    }

    /// The three losses of one batch as one graph: `(itc, itm, itg)`. Training takes the same
    /// gradient in two passes and parallel shards (step.rs); this is its reference.
    pub fn losses(&self, b: &Batch, step: u64) -> Result<(Tensor, Tensor, Tensor)> {
        let n = b.len();
        let image = self.model.image_embeds(&b.pixel_tensor(&self.device)?)?;
        let ids = Tensor::new(b.tokens.ids.clone(), &self.device)?;
        let mask = &b.tokens.mask;

        // ITC: queries alone vs the [CLS] feature of the text alone.
        let img_f = self
            .model
            .itc_image_features(&self.model.query_output(&image)?)?;
        let txt_f = self
            .model
            .itc_text_features(&self.model.text_output(&ids, mask)?)?;
        let temp = self.temp.as_tensor();
        let itc = itc_loss(&img_f, &txt_f, temp)?;

        // ITM: one hard negative per image and per text, drawn from the ITC similarities.
        let truths: Vec<_> = b.truths.iter().collect();
        let (text_for_image, image_for_text) =
            self.hard_negatives(&img_f, &txt_f, &truths, step)?;
        let neg_img_idx = Tensor::new(
            image_for_text.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &self.device,
        )?;
        let images3 = Tensor::cat(&[&image, &image.index_select(&neg_img_idx, 0)?, &image], 0)?;
        let mut ids3 = b.tokens.ids.clone();
        ids3.extend(b.tokens.ids.iter().cloned());
        ids3.extend(text_for_image.iter().map(|&j| b.tokens.ids[j].clone()));
        let mut mask3 = mask.clone();
        mask3.extend(mask.iter().cloned());
        mask3.extend(text_for_image.iter().map(|&j| mask[j].clone()));
        let logits = self
            .model
            .itm_logits(&images3, &Tensor::new(ids3, &self.device)?, &mask3)?;
        let itm = itm_loss(&logits)?;

        // ITG: [DEC] replaces [CLS]; decode through the multimodal causal mask.
        let dec = decoder_ids(&b.tokens.ids, self.dec_id);
        let dec_t = Tensor::new(dec.clone(), &self.device)?;
        let itg_logits = self.model.itg_logits(&image, &dec_t, mask)?;
        let itg = itg_loss(&itg_logits, &dec, mask)?;
        debug_assert_eq!(logits.dim(0)?, 3 * n);
        Ok((itc, itm, itg))
    }

    fn collect(&self, grads: &candle_core::backprop::GradStore, into: &mut Grads) -> Result<()> {
        for (name, var) in self.varmap.data().lock().expect("varmap lock").iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                into.insert(name.clone(), g.clone());
            }
        }
        Ok(())
    }

    /// `config.json`: HF's `Blip2Config` with the CLIP tower's config as `vision_config`.
    pub fn hf_config(&self) -> serde_json::Value {
        let c = &self.config;
        let VisionConfig::Clip(vision) = &c.vision else {
            unreachable!("the task always uses a CLIP tower")
        };
        let mut vision = serde_json::to_value(vision).expect("config serialises");
        vision["model_type"] = "clip_vision_model".into();
        let mut q = serde_json::to_value(&c.qformer).expect("config serialises");
        q["model_type"] = "blip_2_qformer".into();
        serde_json::json!({
            "architectures": ["Blip2ForImageTextRetrieval"],
            "model_type": "blip-2",
            "num_query_tokens": c.num_query_tokens,
            "image_text_hidden_size": c.image_text_hidden_size,
            "qformer_config": q,
            "vision_config": vision,
        })
    }
}

impl Task for QformerTask {
    fn vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn grads(&mut self, micro: &[Batch], step: u64) -> Result<(Grads, LossTerms)> {
        self.step_grads(micro, step)
    }

    fn after_step(&mut self) -> Result<()> {
        // BLIP/ALBEF keep the temperature in [0.001, 0.5].
        let clamped = self.temp.as_tensor().clamp(TEMP_MIN, TEMP_MAX)?;
        self.temp.set(&clamped)?;
        Ok(())
    }

    fn scalars(&self) -> Vec<(String, f32)> {
        self.temp
            .as_tensor()
            .to_scalar::<f32>()
            .map(|t| vec![("temp".to_string(), t)])
            .unwrap_or_default()
    }

    fn write_model(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join("config.json"), &self.hf_config())?;
        write_json(
            &dir.join("preprocessor_config.json"),
            &self.processor.to_hf_json(),
        )?;
        let tok = dir.join("tokenizer.json");
        std::fs::write(&tok, self.tokenizer.json_bytes()).map_err(|e| Error::io(&tok, e))?;
        for (name, bytes) in &self.extra_files {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in &self.frozen {
            tensors.insert(k.clone(), v.contiguous()?);
        }
        for (k, v) in self.vars() {
            tensors.insert(k, v.as_tensor().contiguous()?);
        }
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &weights)
            .map_err(|e| Error::weights(&weights, e.to_string()))
    }

    fn load_weights(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("model.safetensors");
        self.varmap
            .load(&path)
            .map_err(|e| Error::weights(&path, e.to_string()))
    }
}
