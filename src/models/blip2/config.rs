//! `Blip2Config` of a stage-2 directory (transformers' `Blip2ForConditionalGeneration`): the
//! stage-1 parts ([`Blip2Config`]: vision tower, Q-Former, queries) plus the frozen LM's
//! `text_config` (OPT or the Llama family) and `image_token_index`, the `<image>` placeholder
//! that recent processors put `num_query_tokens` times before BOS. Without it the directory uses
//! the legacy layout (LAVIS blip2_opt.py, transformers ≤ 4.46): `[queries; prompt embeddings]`.
//!
//! Beyond HF, `vlalign_language_model`: a path (relative to the model directory, or absolute)
//! to the frozen LM's own directory or `.gguf` file, when the weights are not copied under
//! `language_model.*` — a 135M–7B LM need not be duplicated into every trained Q-Former.

use serde_json::json;

use crate::models::lm::LmConfig;
use crate::models::qformer::Blip2Config;

/// The config key of the external-LM reference.
pub const LANGUAGE_MODEL_KEY: &str = "vlalign_language_model";

#[derive(Clone, Debug, PartialEq)]
pub struct Blip2LmConfig {
    /// Vision tower, Q-Former (queries only) and `num_query_tokens`.
    pub blip2: Blip2Config,
    /// The frozen LM (`text_config`).
    pub text: LmConfig,
    /// The `<image>` placeholder id; `None` is the legacy `[queries; prompt]` layout.
    pub image_token_index: Option<u32>,
    /// Where the LM's weights are when not under `language_model.*`.
    pub language_model: Option<String>,
}

impl Blip2LmConfig {
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let blip2 = Blip2Config::parse(v)?;
        let text = v
            .get("text_config")
            .ok_or("no `text_config`: a stage-2 directory names its language model")?;
        let text = LmConfig::from_json(text).map_err(|m| format!("text_config: {m}"))?;
        let image_token_index = v
            .get("image_token_index")
            .or_else(|| v.get("image_token_id"))
            .and_then(|x| x.as_u64())
            .map(|x| x as u32);
        if let Some(i) = image_token_index {
            if i as usize >= text.vocab_size() {
                return Err(format!(
                    "image_token_index ({i}) is outside the language model's vocabulary \
                     (text_config.vocab_size {})",
                    text.vocab_size()
                ));
            }
        }
        if blip2.num_query_tokens > 1024 {
            return Err(format!(
                "num_query_tokens ({}) must be at most 1024",
                blip2.num_query_tokens
            ));
        }
        let language_model = match v.get(LANGUAGE_MODEL_KEY) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(format!("{LANGUAGE_MODEL_KEY} must be a path string")),
        };
        Ok(Self {
            blip2,
            text,
            image_token_index,
            language_model,
        })
    }

    /// The `config.json` transformers reads as `Blip2ForConditionalGeneration` (plus the
    /// external-LM key when set).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = self.blip2.to_hf_json();
        v["architectures"] = json!(["Blip2ForConditionalGeneration"]);
        v["use_decoder_only_language_model"] = json!(true);
        v["text_config"] = self.text.to_hf_json();
        if let Some(i) = self.image_token_index {
            v["image_token_index"] = json!(i);
        }
        if let Some(p) = &self.language_model {
            v[LANGUAGE_MODEL_KEY] = json!(p);
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("image_text_hidden_size");
        }
        v
    }
}
