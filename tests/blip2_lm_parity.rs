//! BLIP-2 stage 2 against transformers 5.23's `Blip2ForConditionalGeneration` (fixtures from
//! tools/reference/make_blip2_lm_fixtures.py): tiny random directories over an OPT and a Llama
//! decoder, as transformers writes them (tokenizer.json, processor_config.json). The projected
//! query prompts and the logits ≤ 1e-4, greedy generations token-identical — in the processor's
//! `<image>`-token layout (with a prompt, left-padded; and with none) and in the legacy
//! `[queries; prompt]` layout of LAVIS / transformers ≤ 4.46.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture, greedy_ids, max_abs_diff, max_abs_diff_where, reference, rows_u32, scratch};
use vlalign::data::image::processor_for_dir;
use vlalign::models::blip2::{Blip2Lm, QUERY_SLOT};

const TOL: f32 = 1e-4;
const NAMES: [&str; 2] = ["blip2-opt", "blip2-llama"];

fn logits(m: &Blip2Lm, embeds: &Tensor, mask: &[Vec<u32>]) -> Tensor {
    m.lm.logits(&m.lm.forward(embeds, mask, &mut m.lm.cache()).unwrap())
        .unwrap()
}

#[test]
fn image_token_layout_matches_transformers() {
    for name in NAMES {
        let m = Blip2Lm::load(&fixture(name), &Device::Cpu).unwrap();
        let r = reference(&format!("{name}.reference.safetensors"));
        let prefix = m.image_prefix(&r["pixel_values"]).unwrap();
        let d = max_abs_diff(&prefix, &r["language_model_inputs"]);
        println!("{name} language_model_inputs: max abs diff {d:.3e}");
        assert!(d <= TOL, "{name}: projected queries differ by {d:e}");

        let ids = rows_u32(&r["input_ids"]);
        let mask = rows_u32(&r["attention_mask"]);
        let embeds = m.inputs_embeds(&prefix, &ids).unwrap();
        let d = max_abs_diff_where(&logits(&m, &embeds, &mask), &r["logits"], &mask);
        println!("{name} logits: max abs diff {d:.3e}");
        assert!(d <= TOL, "{name}: logits differ by {d:e}");
        assert_eq!(
            greedy_ids(&m.lm, &embeds, &mask, 6),
            rows_u32(&r["generated_ids"]),
            "{name}"
        );

        // No prompt: transformers starts from [<image> × Q, BOS].
        let bos = m.lm_config().bos_token_id().unwrap();
        let (row, row_mask) = m.layout(&[bos], 0, 0);
        let embeds = m.inputs_embeds(&prefix, &[row.clone(), row]).unwrap();
        let got = greedy_ids(&m.lm, &embeds, &[row_mask.clone(), row_mask], 5);
        assert_eq!(got, rows_u32(&r["bare_generated_ids"]), "{name}: no prompt");
    }
}

#[test]
fn legacy_layout_matches_transformers_language_model() {
    for name in NAMES {
        let m = Blip2Lm::load(&fixture(name), &Device::Cpu).unwrap();
        let r = reference(&format!("{name}.reference.safetensors"));
        let prefix = m.image_prefix(&r["pixel_values"]).unwrap();
        let q = m.num_queries();
        // [padding; queries; BOS prompt], as the fixture builds it.
        let ids: Vec<Vec<u32>> = rows_u32(&r["legacy_ids"])
            .into_iter()
            .zip(rows_u32(&r["legacy_mask"]))
            .map(|(ids, mask)| {
                let pad = mask.iter().filter(|&&x| x == 0).count();
                let mut row = ids[..pad].to_vec();
                row.extend(std::iter::repeat_n(QUERY_SLOT, q));
                row.extend_from_slice(&ids[pad..]);
                row
            })
            .collect();
        let mask = rows_u32(&r["legacy_embeds_mask"]);
        let embeds = m.inputs_embeds(&prefix, &ids).unwrap();
        let d = max_abs_diff_where(&logits(&m, &embeds, &mask), &r["legacy_logits"], &mask);
        println!("{name} legacy logits: max abs diff {d:.3e}");
        assert!(d <= TOL, "{name}: legacy logits differ by {d:e}");
        assert_eq!(
            greedy_ids(&m.lm, &embeds, &mask, 6),
            rows_u32(&r["legacy_generated_ids"]),
            "{name}: legacy layout"
        );
    }
}

/// A directory without `image_token_index` lays prompts out the legacy way, and gives the
/// transformers legacy generation.
#[test]
fn directory_without_image_token_uses_the_legacy_layout() {
    let dir = scratch("blip2-legacy-dir");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
    ] {
        std::fs::copy(fixture("blip2-opt").join(f), dir.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(fixture("blip2-opt/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v.as_object_mut().unwrap().remove("image_token_index");
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let m = Blip2Lm::load(&dir, &Device::Cpu).unwrap();
    let r = reference("blip2-opt.reference.safetensors");
    let prefix = m.image_prefix(&r["pixel_values"]).unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (row, row_mask) in rows_u32(&r["legacy_ids"])
        .into_iter()
        .zip(rows_u32(&r["legacy_mask"]))
    {
        let pad = row_mask.iter().filter(|&&x| x == 0).count();
        let (i, k) = m.layout(&row[pad..], pad, 0);
        ids.push(i);
        mask.push(k);
    }
    assert_eq!(mask, rows_u32(&r["legacy_embeds_mask"]));
    let embeds = m.inputs_embeds(&prefix, &ids).unwrap();
    assert_eq!(
        greedy_ids(&m.lm, &embeds, &mask, 6),
        rows_u32(&r["legacy_generated_ids"])
    );
}

/// transformers 5 saves the image processor inside processor_config.json: it is read there.
#[test]
fn image_processor_is_read_from_processor_config() {
    let (p, path) = processor_for_dir(&fixture("blip2-opt")).unwrap().unwrap();
    assert!(path.ends_with("processor_config.json"));
    assert_eq!(p.output_size(), Some((28, 28)));
}

/// End to end through the CLI: PNG files → BLIP image processor → model → greedy generation
/// gives transformers' tokens for the same files (the prompts of the fixture, one per call).
#[test]
fn caption_and_ask_cli_match_transformers_end_to_end() {
    for name in NAMES {
        let r = reference(&format!("{name}.reference.safetensors"));
        let want = rows_u32(&r["generated_ids"]);
        let model = fixture(name);
        for (i, prompt) in ["a photo of a", "a"].iter().enumerate() {
            let img = fixture(&format!("{name}-images/{i}.png"));
            let out = common::json(&common::vlalign(&[
                "caption",
                "--model",
                model.to_str().unwrap(),
                "--image",
                img.to_str().unwrap(),
                "--prompt",
                prompt,
                "--beams",
                "1",
                "--max-new-tokens",
                "6",
                "--min-new-tokens",
                "6",
                "--json",
            ]));
            let c = &out["captions"][0];
            assert_eq!(c["prompt"], *prompt);
            let ids: Vec<u32> = c["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, want[i], "{name} image {i}");
            assert!(c["text"].is_string());
        }
    }
    // `ask` wraps the question; a stage-1 directory is a clear error.
    let img = fixture("blip2-opt-images/0.png");
    let out = common::json(&common::vlalign(&[
        "ask",
        "--model",
        fixture("blip2-opt").to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--question",
        "what colour is the circle?",
        "--beams",
        "2",
        "--max-new-tokens",
        "3",
        "--json",
    ]));
    let c = &out["captions"][0];
    assert_eq!(c["prompt"], "Question: what colour is the circle? Answer:");
    let n = c["token_ids"].as_array().unwrap().len();
    assert!((1..=3).contains(&n), "{c}");
    let o = common::vlalign(&[
        "ask",
        "--model",
        fixture("qformer-a").to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--question",
        "what?",
    ]);
    common::assert_user_error(&o, "needs a BLIP-2 stage-2 directory");
    let o = common::vlalign(&[
        "caption",
        "--model",
        fixture("blip2-opt").to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--top-p",
        "1.5",
    ]);
    common::assert_user_error(&o, "top_p (1.5) must be in (0, 1]");
}
