//! CLIP against transformers 5.23 (fixtures from tools/reference/make_clip_fixtures.py): two
//! tiny random configurations — quick_gelu with legacy argmax pooling, and gelu with first-EOS
//! pooling, float16 storage and layer_norm_eps 1e-6 — must match at ≤ 1e-4 max abs diff.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff, reference, rows_u32};
use vlalign::infer::ClipPipeline;
use vlalign::io::Weights;
use vlalign::models::clip::Clip;
use vlalign::models::ModelDir;

const TOL: f32 = 1e-4;

fn load(name: &str) -> Clip {
    let dir = fixture(name);
    let md = ModelDir::open(&dir).unwrap();
    let (cfg, layout) = md.clip("the parity test").unwrap();
    let w = Weights::open(&dir).unwrap();
    w.build(DType::F32, &Device::Cpu, &[], |vb| {
        Clip::new(vb, cfg, layout)
    })
    .unwrap()
}

fn check(name: &str) {
    let model = load(name);
    let r = reference(&format!("{name}.reference.safetensors"));
    let (ids, mask) = (rows_u32(&r["input_ids"]), rows_u32(&r["attention_mask"]));
    let px = &r["pixel_values"];
    let (vis_last, _) = model.vision.as_ref().unwrap().forward(px).unwrap();
    let (txt_last, _) = model.text.as_ref().unwrap().forward(&ids, &mask).unwrap();
    let img = model.image_features(px).unwrap();
    let txt = model.text_features(&ids, &mask).unwrap();
    let logits = model.logits_per_image(&img, &txt).unwrap();
    let diffs = [
        (
            "vision_last_hidden_state",
            max_abs_diff(&vis_last, &r["vision_last_hidden_state"]),
        ),
        (
            "text_last_hidden_state",
            max_abs_diff(&txt_last, &r["text_last_hidden_state"]),
        ),
        ("image_features", max_abs_diff(&img, &r["image_features"])),
        ("text_features", max_abs_diff(&txt, &r["text_features"])),
        (
            "logits_per_image",
            max_abs_diff(&logits, &r["logits_per_image"]),
        ),
    ];
    for (what, d) in diffs {
        println!("{name} {what}: max abs diff {d:.3e}");
        assert!(d <= TOL, "{name} {what}: max abs diff {d:e} > {TOL:e}");
    }
}

#[test]
fn clip_a_quick_gelu_matches_transformers() {
    check("clip-a");
}

#[test]
fn clip_b_gelu_fp16_weights_matches_transformers() {
    check("clip-b");
}

/// Through the model directory as `vlalign embed` runs it: bundled tokenizer (clip-b has no
/// tokenizer.json), preprocessor_config.json, PNG decoding, batching, normalisation.
#[test]
fn clip_b_end_to_end_matches_transformers() {
    let p = ClipPipeline::load(&fixture("clip-b"), &Device::Cpu).unwrap();
    let r = reference("clip-b.reference.safetensors");
    let texts: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(fixture("clip-b-images/texts.json")).unwrap(),
    )
    .unwrap();
    let norm = |t: &Tensor| vlalign::nn::ops::l2_normalize(t).unwrap();
    let got = p.embed_texts(&texts).unwrap();
    let d = max_abs_diff(&got, &norm(&r["e2e_text_features"]));
    println!("e2e text embeddings: max abs diff {d:.3e}");
    assert!(d <= TOL, "text {d:e}");
    let images: Vec<_> = (0..2)
        .map(|i| fixture(&format!("clip-b-images/img{i}.png")))
        .collect();
    let got = p.embed_image_files(&images).unwrap();
    let d = max_abs_diff(&got, &norm(&r["e2e_image_features"]));
    println!("e2e image embeddings: max abs diff {d:.3e}");
    assert!(d <= TOL, "image {d:e}");
}
