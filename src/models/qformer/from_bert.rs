//! The Q-Former's starting values from a BERT checkpoint, as BLIP-2 starts from BERT-base (LAVIS
//! `blip2.py` `init_Qformer`; `blip2_qformer.py` copies every feed-forward into its `_query`
//! twin): embeddings (word rows beyond BERT's vocabulary, e.g. [DEC], stay random; the first
//! `positions` position rows), the embedding LayerNorm as `qformer.layernorm`, and per layer
//! self-attention and both feed-forwards. Cross-attention has no counterpart and stays random;
//! BERT's token-type table is dropped (the Q-Former has none), as in LAVIS.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::io::Weights;
use crate::models::bert::BertConfig;
use crate::models::ModelDir;

/// BERT tensor (relative to `encoder.layer.{i}`) → Q-Former tensor (relative to
/// `qformer.encoder.layer.{i}`), for `weight` and `bias` each.
const LAYER_MAP: [(&str, &str); 11] = [
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

/// The BERT config of `dir` (a BERT model directory), naming `dir` when it is not one.
pub fn bert_config(dir: &Path) -> Result<BertConfig> {
    Ok(ModelDir::open(dir)?
        .bert("starting a Q-Former from it (qformer.init)")?
        .clone())
}

/// The BERT of `dir` and the Q-Former tensors it gives, by HF `Blip2ForImageTextRetrieval`
/// name. `vocab` rows of word embeddings (rows past BERT's vocabulary drawn from N(0, 0.02)
/// under `seed`), `positions` position rows.
pub fn qformer_from_bert(
    dir: &Path,
    vocab: usize,
    positions: usize,
    seed: u64,
    device: &Device,
) -> Result<(BertConfig, HashMap<String, Tensor>)> {
    let bert = bert_config(dir)?;
    if positions > bert.max_position_embeddings {
        return Err(Error::config(
            dir.join("config.json"),
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
    let vb = w.var_builder(DType::F32, device);
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
        Tensor::cat(&[&words, &Tensor::from_vec(v, (extra, h), device)?], 0)?
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
        for p in ["weight", "bias"] {
            for (a, b) in LAYER_MAP {
                init.insert(
                    format!("qformer.encoder.layer.{i}.{b}.{p}"),
                    get(&format!("encoder.layer.{i}.{a}.{p}"))?,
                );
            }
        }
    }
    Ok((bert, init))
}
