//! Q-Former stage-1 objectives against the PyTorch formulas as LAVIS writes them
//! (tools/reference/make_qformer_loss_fixtures.py, float64): ITC (max over queries, learned
//! temperature, label smoothing), ITM (3B rows), ITG (shifted, padding ignored, smoothing), the
//! hard-negative distributions; and the masks' behaviour on a real Q-Former (the qformer-a
//! fixture): under ITG the output at text position i ignores text after i; under ITC the query
//! outputs ignore the text entirely (and equal the queries-only pass); under ITM they do not.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::{fixture, max_abs_diff, reference, rows_u32};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vlalign::models::qformer::Blip2Qformer;
use vlalign::nn::mask::QformerMode;
use vlalign::objectives::itc::itc_loss;
use vlalign::objectives::itg::itg_loss;
use vlalign::objectives::itm::{
    itm_loss, negative_weights, negative_weights_excluding, sample_hard_negatives,
    sample_hard_negatives_excluding,
};

const TOL: f32 = 1e-12;

fn r() -> std::collections::HashMap<String, Tensor> {
    reference("qformer_losses.reference.safetensors")
}

#[test]
fn itc_loss_and_gradients_match_lavis() {
    let r = r();
    let img = Var::from_tensor(&r["itc/image"]).unwrap();
    let txt = Var::from_tensor(&r["itc/text"]).unwrap();
    let temp = Var::from_tensor(&r["itc/temp"]).unwrap();
    let loss = itc_loss(&img, &txt, &temp).unwrap();
    assert!(max_abs_diff(&loss, &r["itc/loss"]) < TOL);
    let g = loss.backward().unwrap();
    for (v, k) in [
        (&img, "itc/grad_image"),
        (&txt, "itc/grad_text"),
        (&temp, "itc/grad_temp"),
    ] {
        let d = max_abs_diff(g.get(v).unwrap(), &r[k]);
        assert!(d < TOL, "{k} off by {d}");
    }
}

#[test]
fn itm_loss_matches_torch() {
    let r = r();
    let logits = Var::from_tensor(&r["itm/logits"]).unwrap();
    let loss = itm_loss(&logits).unwrap();
    assert!(max_abs_diff(&loss, &r["itm/loss"]) < TOL);
    let g = loss.backward().unwrap();
    assert!(max_abs_diff(g.get(&logits).unwrap(), &r["itm/grad_logits"]) < TOL);
    assert!(itm_loss(&logits.narrow(0, 0, 4).unwrap()).is_err());
}

#[test]
fn itg_loss_matches_torch() {
    let r = r();
    let logits = Var::from_tensor(&r["itg/logits"]).unwrap();
    let ids = rows_u32(&r["itg/ids"]);
    let mask = rows_u32(&r["itg/mask"]);
    let loss = itg_loss(&logits, &ids, &mask).unwrap();
    assert!(max_abs_diff(&loss, &r["itg/loss"]) < TOL);
    let g = loss.backward().unwrap();
    assert!(max_abs_diff(g.get(&logits).unwrap(), &r["itg/grad_logits"]) < TOL);
}

#[test]
fn hard_negative_weights_match_lavis_and_sampling_follows_them() {
    let r = r();
    let sim = r["neg/sim"].to_dtype(DType::F32).unwrap();
    let s: Vec<Vec<f32>> = sim.to_vec2().unwrap();
    let b = s.len();
    let i2t: Vec<Vec<f64>> = (0..b)
        .map(|i| negative_weights(b, &|j| s[i][j], i))
        .collect();
    let t2i: Vec<Vec<f64>> = (0..b)
        .map(|j| negative_weights(b, &|i| s[i][j], j))
        .collect();
    let want_i2t: Vec<Vec<f64>> = r["neg/weights_i2t"].to_vec2().unwrap();
    let want_t2i: Vec<Vec<f64>> = r["neg/weights_t2i"].to_vec2().unwrap();
    for (got, want) in [(&i2t, &want_i2t), (&t2i, &want_t2i)] {
        for (g, w) in got.iter().zip(want.iter()) {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
    }
    // Sampling: never the positive, frequencies follow the weights, same seed same draws.
    let n = 20_000;
    let mut counts = vec![vec![0usize; b]; b];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..n {
        let (text_for_image, image_for_text) = sample_hard_negatives(&sim, &mut rng).unwrap();
        for i in 0..b {
            assert_ne!(text_for_image[i], i);
            assert_ne!(image_for_text[i], i);
            counts[i][text_for_image[i]] += 1;
        }
    }
    for i in 0..b {
        for j in 0..b {
            let p = i2t[i][j];
            let f = counts[i][j] as f64 / n as f64;
            // 5 standard errors of a binomial proportion.
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (f - p).abs() <= 5.0 * se + 1e-9,
                "image {i} text {j}: {f} vs {p}"
            );
        }
    }
    let a = sample_hard_negatives(&sim, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
    let b2 = sample_hard_negatives(&sim, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
    assert_eq!(a, b2);
}

/// With `image_id`s LAVIS fills every same-id pair with −10000 before the softmax; the
/// excluding sampler must draw from exactly that distribution, never an excluded pair, and fall
/// back to the diagonal mask for a row whose every candidate is excluded.
#[test]
fn hard_negatives_skip_pairs_known_to_match() {
    let r = r();
    let sim = r["neg/sim"].to_dtype(DType::F32).unwrap();
    let s: Vec<Vec<f32>> = sim.to_vec2().unwrap();
    let b = s.len();
    assert!(b >= 4);
    // Images 0 and 1 show the same thing (one image_id); image 2's caption is also true of 3.
    let same = |i: usize, j: usize| (i < 2 && j < 2) || (i == 3 && j == 2);
    let lavis = |row: &dyn Fn(usize) -> f64, masked: &dyn Fn(usize) -> bool| -> Vec<f64> {
        let x: Vec<f64> = (0..b)
            .map(|k| if masked(k) { -10000.0 } else { row(k) })
            .collect();
        let m = x.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
        x.iter().map(|v| (v - m).exp() / z).collect()
    };
    for (i, row) in s.iter().enumerate() {
        let got = negative_weights_excluding(b, &|j| row[j], &|j| j == i || same(i, j));
        let want = lavis(&|j| row[j] as f64, &|j| j == i || same(i, j));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9, "{g} vs {w}");
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..2000 {
        let (t4i, i4t) = sample_hard_negatives_excluding(&sim, &same, &mut rng).unwrap();
        for k in 0..b {
            assert!(
                t4i[k] != k && !same(k, t4i[k]),
                "image {k} drew text {}",
                t4i[k]
            );
            assert!(
                i4t[k] != k && !same(i4t[k], k),
                "text {k} drew image {}",
                i4t[k]
            );
        }
    }
    // Everything matches: each row falls back to "anything but the positive".
    let (t4i, i4t) = sample_hard_negatives_excluding(&sim, &|_, _| true, &mut rng).unwrap();
    assert!((0..b).all(|k| t4i[k] != k && i4t[k] != k));
}

/// The qformer-a fixture model with its image features and texts.
fn model_and_inputs() -> (Blip2Qformer, Tensor, Tensor, Vec<Vec<u32>>) {
    let model = Blip2Qformer::load(&fixture("qformer-a"), &Device::Cpu).unwrap();
    let r = reference("qformer-a.reference.safetensors");
    let image = model.image_embeds(&r["pixel_values"]).unwrap();
    let image = Tensor::cat(&[&image, &image.i(0..1).unwrap()], 0).unwrap(); // 3 rows
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = vec![vec![1u32; ids.dim(1).unwrap()]; 3];
    (model, image, ids, mask)
}

/// `ids` with every token from position `from` on replaced.
fn change_tail(ids: &Tensor, from: usize) -> Tensor {
    let mut v: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    for row in &mut v {
        for x in row.iter_mut().skip(from) {
            *x = (*x + 17) % 99;
        }
    }
    Tensor::new(v, &Device::Cpu).unwrap()
}

#[test]
fn itg_mask_keeps_positions_blind_to_later_text() {
    let (model, image, ids, mask) = model_and_inputs();
    let q = model.num_queries();
    let cut = 3;
    let a = model
        .multimodal(QformerMode::Itg, &image, &ids, &mask)
        .unwrap();
    let b = model
        .multimodal(QformerMode::Itg, &image, &change_tail(&ids, cut + 1), &mask)
        .unwrap();
    // Queries and text positions ≤ cut are unchanged; position cut + 1 changes.
    let same = max_abs_diff(
        &a.narrow(1, 0, q + cut + 1).unwrap(),
        &b.narrow(1, 0, q + cut + 1).unwrap(),
    );
    assert!(
        same == 0.0,
        "outputs up to text position {cut} moved by {same}"
    );
    let moved = max_abs_diff(
        &a.narrow(1, q + cut + 1, 1).unwrap(),
        &b.narrow(1, q + cut + 1, 1).unwrap(),
    );
    assert!(
        moved > 1e-3,
        "position {} should see its own new token",
        cut + 1
    );
}

#[test]
fn itc_mask_keeps_queries_blind_to_text_and_itm_does_not() {
    let (model, image, ids, mask) = model_and_inputs();
    let q = model.num_queries();
    let other = change_tail(&ids, 0);
    let itc_a = model
        .multimodal(QformerMode::Itc, &image, &ids, &mask)
        .unwrap();
    let itc_b = model
        .multimodal(QformerMode::Itc, &image, &other, &mask)
        .unwrap();
    let queries_only = model.query_output(&image).unwrap();
    let d_text = max_abs_diff(
        &itc_a.narrow(1, 0, q).unwrap(),
        &itc_b.narrow(1, 0, q).unwrap(),
    );
    assert!(
        d_text == 0.0,
        "ITC query outputs moved by {d_text} when the text changed"
    );
    let d_sep = max_abs_diff(&itc_a.narrow(1, 0, q).unwrap(), &queries_only);
    assert!(d_sep < 1e-5, "ITC joint pass vs queries-only pass: {d_sep}");
    let itm_a = model
        .multimodal(QformerMode::Itm, &image, &ids, &mask)
        .unwrap();
    let itm_b = model
        .multimodal(QformerMode::Itm, &image, &other, &mask)
        .unwrap();
    let d_itm = max_abs_diff(
        &itm_a.narrow(1, 0, q).unwrap(),
        &itm_b.narrow(1, 0, q).unwrap(),
    );
    assert!(
        d_itm > 1e-3,
        "ITM query outputs should see the text (moved by {d_itm})"
    );
}
