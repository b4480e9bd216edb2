//! The `vlalign` binary as a user runs it: `embed` and `zeroshot` outputs against the
//! transformers fixtures, and one-line errors with exit code 1 (2 for bad arguments).

mod common;

use candle_core::{Device, Tensor};
use common::{assert_user_error, fixture, json, reference, scratch, stderr, vlalign};

fn normalised_rows(t: &Tensor) -> Vec<Vec<f32>> {
    vlalign::nn::ops::l2_normalize(t)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn texts() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixture("clip-b-images/texts.json")).unwrap())
        .unwrap()
}

#[test]
fn embed_json_matches_transformers() {
    let model = fixture("clip-b");
    let img0 = fixture("clip-b-images/img0.png");
    let img1 = fixture("clip-b-images/img1.png");
    let texts = texts();
    let mut args = vec![
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "--image",
    ];
    args.extend([img0.to_str().unwrap(), img1.to_str().unwrap()]);
    args.push("--text");
    args.extend(texts.iter().map(String::as_str));
    let v = json(&vlalign(&args));
    let r = reference("clip-b.reference.safetensors");
    let emb = |k: &str| -> Vec<Vec<f32>> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| {
                x["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    assert_eq!(v["images"][1]["path"], img1.to_str().unwrap());
    assert_eq!(v["texts"][3]["text"], texts[3]);
    let di = max_diff(&emb("images"), &normalised_rows(&r["e2e_image_features"]));
    let dt = max_diff(&emb("texts"), &normalised_rows(&r["e2e_text_features"]));
    assert!(di <= 1e-4 && dt <= 1e-4, "image {di}, text {dt}");
}

#[test]
fn embed_writes_npy() {
    let out = scratch("embed-npy").join("e.npy");
    let o = vlalign(&[
        "embed",
        "--model",
        fixture("clip-b").to_str().unwrap(),
        "--image",
        fixture("clip-b-images/img0.png").to_str().unwrap(),
        "--text",
        "a",
        "b",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b = std::fs::read(&out).unwrap();
    let header = String::from_utf8_lossy(&b[10..128]);
    assert!(header.contains("'shape': (3, 20)"), "{header}");
}

#[test]
fn zeroshot_probabilities_follow_the_logit_scale() {
    let labels = [texts()[0].clone(), texts()[3].clone()];
    let o = vlalign(&[
        "zeroshot",
        "--model",
        fixture("clip-b").to_str().unwrap(),
        "--image",
        fixture("clip-b-images/img1.png").to_str().unwrap(),
        "--labels",
        &labels.join(","),
        "--template",
        "{}",
        "--json",
    ]);
    let v = json(&o);
    // Expected: softmax(exp(logit_scale) · cos) with transformers' features and the stored scale.
    let r = reference("clip-b.reference.safetensors");
    let w =
        candle_core::safetensors::load(fixture("clip-b/model.safetensors"), &Device::Cpu).unwrap();
    let scale = w["logit_scale"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .exp();
    let img = &normalised_rows(&r["e2e_image_features"])[1];
    let txt = normalised_rows(&r["e2e_text_features"]);
    let logits: Vec<f32> = [0, 3]
        .iter()
        .map(|&i| scale * img.iter().zip(&txt[i]).map(|(a, b)| a * b).sum::<f32>())
        .collect();
    let m = logits.iter().cloned().fold(f32::MIN, f32::max);
    let z: f32 = logits.iter().map(|l| (l - m).exp()).sum();
    let preds = v["images"][0]["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    for p in preds {
        let i = labels
            .iter()
            .position(|l| l == p["label"].as_str().unwrap())
            .unwrap();
        let want = (logits[i] - m).exp() / z;
        let got = p["prob"].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-4, "{}: {got} vs {want}", labels[i]);
    }
    assert!(
        preds[0]["prob"].as_f64() >= preds[1]["prob"].as_f64(),
        "sorted"
    );
}

#[test]
fn user_errors_are_one_line_with_exit_1() {
    let model = fixture("clip-b");
    let model = model.to_str().unwrap();
    let img = fixture("clip-b-images/img0.png");
    let img = img.to_str().unwrap();
    assert_user_error(
        &vlalign(&["embed", "--model", "/nonexistent/model", "--text", "a"]),
        "does not exist",
    );
    let dir = scratch("cli-no-weights");
    std::fs::copy(fixture("clip-b/config.json"), dir.join("config.json")).unwrap();
    assert_user_error(
        &vlalign(&["embed", "--model", dir.to_str().unwrap(), "--text", "a"]),
        "no model.safetensors",
    );
    let notimg = dir.join("notes.jpg");
    std::fs::write(&notimg, "hello").unwrap();
    assert_user_error(
        &vlalign(&[
            "embed",
            "--model",
            model,
            "--image",
            notimg.to_str().unwrap(),
        ]),
        "notes.jpg",
    );
    assert_user_error(
        &vlalign(&["embed", "--model", model, "--image", "/nonexistent.png"]),
        "/nonexistent.png",
    );
    assert_user_error(
        &vlalign(&["zeroshot", "--model", model, "--image", img, "--labels", ""]),
        "--labels is empty",
    );
    assert_user_error(
        &vlalign(&[
            "zeroshot",
            "--model",
            model,
            "--image",
            img,
            "--labels",
            "a,b",
            "--template",
            "x",
        ]),
        "{}",
    );
    assert_user_error(&vlalign(&["embed", "--model", model]), "nothing to embed");
}

#[test]
fn bad_arguments_exit_2() {
    let o = vlalign(&["embed", "--frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = vlalign(&["zeroshot", "--model", "x"]);
    assert_eq!(o.status.code(), Some(2));
    // Choices are enums: a bad value exits 2 and lists the accepted ones.
    for (args, accepted) in [
        (&["demo", "--stage", "clipp"][..], "qformer"),
        (
            &["data", "shapes", "--out", "x", "--pairs", "some"][..],
            "held-out",
        ),
        (
            &[
                "retrieve", "--model", "m", "--query", "q", "--images", "i", "--rerank", "bm25",
            ][..],
            "itm",
        ),
        (
            &["embed", "--model", "m", "--text", "a", "--device", "tpu"][..],
            "cuda:N",
        ),
    ] {
        let o = vlalign(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(accepted), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn device_is_a_parameter_of_every_verb_that_runs_a_model() {
    let model = fixture("clip-b");
    let model = model.to_str().unwrap();
    let o = vlalign(&[
        "embed", "--model", model, "--text", "a", "--device", "cpu", "--json",
    ]);
    assert_eq!(json(&o)["texts"].as_array().unwrap().len(), 1);
    // This build has no CUDA: asking for it is a one-line user error, not a crash.
    assert_user_error(
        &vlalign(&[
            "embed", "--model", model, "--text", "a", "--device", "cuda:1",
        ]),
        "built without CUDA",
    );
    for verb in [
        "demo", "train", "eval", "embed", "zeroshot", "itm", "caption", "retrieve", "bench",
    ] {
        let help = String::from_utf8_lossy(&vlalign(&[verb, "--help"]).stdout).into_owned();
        assert!(help.contains("--device"), "{verb} --help: {help}");
    }
}

#[test]
fn long_text_is_truncated_with_a_warning() {
    let long = "word ".repeat(100);
    let o = vlalign(&[
        "embed",
        "--model",
        fixture("clip-b").to_str().unwrap(),
        "--text",
        &long,
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("truncated") && e.contains("77"), "{e}");
}

#[test]
fn a_benchmark_row_reports_its_time_rate_and_memory() {
    let o = vlalign(&[
        "bench",
        "--only",
        "loader_shapes",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ]);
    let r = json(&o);
    let ms = r["ms"].as_f64().unwrap();
    let all: Vec<f64> = r["ms_all"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(all.len(), 3);
    // The median is one of the timed iterations, and the rate follows from it.
    assert!(all.contains(&ms), "{r}");
    let rate = r["samples_per_s"].as_f64().unwrap();
    assert!((rate - 64.0 / (ms / 1e3)).abs() < 1e-6 * rate, "{r}");
    assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
    assert_user_error(
        &vlalign(&["bench", "--only", "nonsense"]),
        "no benchmark row \"nonsense\" (rows: clip_tiny_train",
    );
}
