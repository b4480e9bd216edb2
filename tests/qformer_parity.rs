//! The BLIP-2 Q-Former against transformers 5.23's `Blip2ForImageTextRetrieval` (fixtures from
//! tools/reference/make_qformer_fixtures.py): two tiny random configurations (cross-attention
//! every 2nd / every layer, gelu / quick_gelu vision, different widths and query counts) must
//! match at ≤ 1e-4 — image features, query outputs, text outputs, ITC features and similarity
//! (max over queries), the ITM pass and its logits — and BlipImageProcessor's preprocessing
//! (resize straight to the size, no crop) on odd-sized images: bit-exact with the PIL backend
//! when both axes shrink (image 0, 45×37 → 28²), and within 0.02 normalised units (1/255 level,
//! measured 0.015 on < 0.5% of values) of the default torchvision backend for both images.
//! Image 1 (23×61 → 28²: wider but shorter) differs from Pillow 13 by up to 8 levels (0.14):
//! Pillow 13 chooses the order of its two passes by a cost estimate and runs the vertical one
//! first here, while vlalign, torchvision and Pillow ≤ 12 always go horizontal first.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff, reference, rows_u32};
use vlalign::data::image::{load_rgb, ImageProcessor};
use vlalign::models::qformer::Blip2Qformer;
use vlalign::nn::mask::QformerMode;
use vlalign::objectives::itc::max_over_queries;

const TOL: f32 = 1e-4;

fn check(name: &str) {
    let model = Blip2Qformer::load(&fixture(name), &Device::Cpu).unwrap();
    let r = reference(&format!("{name}.reference.safetensors"));
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = rows_u32(&r["attention_mask"]);
    let image = model.image_embeds(&r["pixel_values"]).unwrap();
    let query = model.query_output(&image).unwrap();
    let text = model.text_output(&ids, &mask).unwrap();
    let img_f = model.itc_image_features(&query).unwrap();
    let txt_f = model.itc_text_features(&text).unwrap();
    let sim = max_over_queries(&img_f, &txt_f).unwrap();
    let rows = r["itm_pixel_rows"].to_dtype(DType::U32).unwrap();
    let itm_image = image.index_select(&rows, 0).unwrap();
    let itm_out = model
        .multimodal(QformerMode::Itm, &itm_image, &ids, &mask)
        .unwrap();
    let itm = model.itm_logits(&itm_image, &ids, &mask).unwrap();
    // Padded text rows are not compared: HF computes them too, but nothing reads them and
    // their values depend on how a fully padded key row is treated.
    let valid = |t: &Tensor, offset: usize| -> Vec<(Tensor, usize)> {
        mask.iter()
            .enumerate()
            .map(|(b, m)| {
                let n = m.iter().filter(|&&x| x == 1).count();
                (t.get(b).unwrap().narrow(0, 0, offset + n).unwrap(), b)
            })
            .collect()
    };
    let q = model.num_queries();
    let mut diffs = vec![
        ("image_embeds", max_abs_diff(&image, &r["image_embeds"])),
        ("query_output", max_abs_diff(&query, &r["query_output"])),
        (
            "itc_image_embeds",
            max_abs_diff(&img_f, &r["itc_image_embeds"]),
        ),
        (
            "itc_text_embeds",
            max_abs_diff(&txt_f, &r["itc_text_embeds"]),
        ),
        (
            "itc_logits_per_image",
            max_abs_diff(&sim, &r["itc_logits_per_image"]),
        ),
        ("itm_logits", max_abs_diff(&itm, &r["itm_logits"])),
    ];
    let mut text_d = 0f32;
    for (t, b) in valid(&text, 0) {
        let n = t.dim(0).unwrap();
        text_d = text_d.max(max_abs_diff(
            &t,
            &r["text_output"].get(b).unwrap().narrow(0, 0, n).unwrap(),
        ));
    }
    let mut itm_d = 0f32;
    for (t, b) in valid(&itm_out, q) {
        let n = t.dim(0).unwrap();
        itm_d = itm_d.max(max_abs_diff(
            &t,
            &r["itm_output"].get(b).unwrap().narrow(0, 0, n).unwrap(),
        ));
    }
    diffs.push(("text_output (unpadded positions)", text_d));
    diffs.push(("itm_output (unpadded positions)", itm_d));

    let proc = ImageProcessor::from_file(&fixture(name).join("preprocessor_config.json")).unwrap();
    let (pil, tv) = (&r["e2e_pixel_values"], &r["e2e_pixel_values_torchvision"]);
    let mut pixels = Vec::new();
    for i in 0..2 {
        let img = load_rgb(&fixture(&format!("{name}-images/img{i}.png"))).unwrap();
        let (px, (h, w)) = proc.preprocess(&img).unwrap();
        pixels.push(Tensor::from_vec(px, (3, h, w), &Device::Cpu).unwrap());
    }
    diffs.push((
        "pixels, image 0 vs PIL backend",
        max_abs_diff(&pixels[0], &pil.get(0).unwrap()),
    ));
    for (what, d) in diffs {
        println!("{name} {what}: max abs diff {d:.3e}");
        assert!(d <= TOL, "{name} {what}: max abs diff {d:e} > {TOL:e}");
    }
    println!(
        "{name} pixels, image 1 vs PIL backend (Pillow 13 pass order): max abs diff {:.3e}",
        max_abs_diff(&pixels[1], &pil.get(1).unwrap())
    );
    for (i, px) in pixels.iter().enumerate() {
        let d = max_abs_diff(px, &tv.get(i).unwrap());
        println!("{name} pixels, image {i} vs torchvision backend: max abs diff {d:.3e}");
        assert!(d <= 0.02, "{name} image {i} vs torchvision: {d} > 0.02");
    }
}

#[test]
fn qformer_a_matches_transformers() {
    check("qformer-a");
}

#[test]
fn qformer_b_matches_transformers() {
    check("qformer-b");
}

/// Mixed precision (`Blip2Qformer::set_compute`, `train.precision = "bf16"`): the frozen
/// BLIP-2 (EVA-style) vision tower and the Q-Former's blocks compute their products in bfloat16,
/// their LayerNorms and residual streams in float32; the image features and query outputs stay
/// float32 and within bfloat16's precision of transformers' float32 ones (largest difference at
/// most 3% of the largest value; seen 0.6–1.0%).
#[test]
fn bf16_products_stay_within_bfloat16_precision_of_transformers() {
    for name in ["qformer-a", "qformer-b"] {
        let mut model = Blip2Qformer::load(&fixture(name), &Device::Cpu).unwrap();
        model.set_compute(DType::BF16);
        let r = reference(&format!("{name}.reference.safetensors"));
        let image = model.image_embeds(&r["pixel_values"]).unwrap();
        let query = model.query_output(&image).unwrap();
        for (what, ours, theirs) in [
            ("image_embeds", &image, &r["image_embeds"]),
            ("query_output", &query, &r["query_output"]),
        ] {
            assert_eq!(ours.dtype(), DType::F32, "{name} {what}");
            let d = max_abs_diff(ours, theirs);
            let scale = max_abs_diff(&theirs.zeros_like().unwrap(), theirs);
            println!("{name} bf16 {what}: max abs diff {d:.3e} of max |value| {scale:.3e}");
            assert!(
                d <= 0.03 * scale && d > 1e-6,
                "{name} {what}: {d:e} of {scale:e}"
            );
        }
    }
}
