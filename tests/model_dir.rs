//! Model directories: strict loading errors (missing, extra, wrong-shaped tensors; no weights;
//! pickle), and the round trip — a directory written by vlalign from trainable candle variables
//! loads back with identical outputs. tools/reference/check_model_dir.py then checks the written
//! directory (target/tmp/roundtrip-clip-a) in transformers.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{fixture, max_abs_diff, reference, scratch};
use vlalign::data::image::ImageProcessor;
use vlalign::data::text::CLIP_TOKENIZER_JSON;
use vlalign::infer::{ClipPipeline, Pipeline};
use vlalign::io::model_files::{save_model_dir, ModelFiles};
use vlalign::models::clip::Clip;
use vlalign::models::{ModelDir, ModelKind};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn load_err(dir: &std::path::Path) -> String {
    match ClipPipeline::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites clip-a's weights through `edit` into a scratch directory.
fn edited(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> std::path::PathBuf {
    let dir = scratch(name);
    copy_dir(&fixture("clip-a"), &dir);
    let mut t =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited("missing-tensor", |t| {
        t.remove("text_model.encoder.layers.1.mlp.fc2.bias");
    });
    let e = load_err(&dir);
    assert!(
        e.contains("missing tensor `text_model.encoder.layers.1.mlp.fc2.bias`"),
        "{e}"
    );
    assert!(e.contains("[32]"), "expected shape in {e}");
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = edited("wrong-shape", |t| {
        t.insert(
            "visual_projection.weight".into(),
            Tensor::zeros((25, 48), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    assert!(
        e.contains("`visual_projection.weight` has shape [25, 48], the config expects [24, 48]"),
        "{e}"
    );
}

#[test]
fn extra_tensor_is_named() {
    let dir = edited("extra-tensor", |t| {
        t.insert(
            "vision_model.extra.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&dir);
    assert!(
        e.contains("unexpected tensor `vision_model.extra.weight` [3]"),
        "{e}"
    );
}

#[test]
fn directory_problems_are_clear() {
    let e = load_err(&scratch("x").join("does-not-exist"));
    assert!(e.contains("does not exist"), "{e}");
    let dir = scratch("no-weights");
    std::fs::copy(fixture("clip-a/config.json"), dir.join("config.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("no model.safetensors"), "{e}");
    std::fs::write(dir.join("pytorch_model.bin"), b"pickle").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("never pickle"), "{e}");
    let e = load_err(&scratch("empty"));
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");
    let dir = scratch("bad-config");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "clip", "text_config": {"hidden_size": "wide"}}"#,
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("invalid type"),
        "{e}"
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "clip", "vision_config": {"hidden_act": "swishy"}}"#,
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("swishy"), "{e}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "clip", "text_config": {"hidden_size": 30, "num_attention_heads": 4}}"#,
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("text_config.hidden_size (30)"), "{e}");
}

/// A model with a NaN or infinite weight would score every input the same (and rank every truth
/// first); it is refused at load, naming the tensor. Config values that make every output NaN
/// are refused by name too.
#[test]
fn non_finite_weights_and_nan_making_configs_are_refused() {
    for bad in [f32::NAN, f32::INFINITY] {
        let dir = edited("nan-weight", |t| {
            let w = &t["vision_model.post_layernorm.weight"];
            let mut v = w.to_vec1::<f32>().unwrap();
            v[3] = bad;
            t.insert(
                "vision_model.post_layernorm.weight".into(),
                Tensor::from_vec(v, w.shape(), &Device::Cpu).unwrap(),
            );
        });
        let e = load_err(&dir);
        assert!(
            e.contains("`vision_model.post_layernorm.weight`")
                && e.contains("non-finite")
                && e.contains("element 3"),
            "{e}"
        );
    }
    let dir = scratch("nan-eps");
    copy_dir(&fixture("clip-a"), &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["vision_config"]["layer_norm_eps"] = serde_json::json!(-10.0);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("vision_config.layer_norm_eps (-10)"), "{e}");
    copy_dir(&fixture("clip-a"), &dir);
    let pre = std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&pre).unwrap();
    v["rescale_factor"] = serde_json::json!(0.0);
    std::fs::write(dir.join("preprocessor_config.json"), v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("rescale_factor"), "{e}");
}

/// Every kind is decided by `ModelDir::open` from config.json; a verb that needs another kind,
/// or a directory of a kind vlalign does not run, gets one error naming what was found.
#[test]
fn model_kinds_are_decided_in_one_place() {
    let kind = |name: &str| ModelDir::open(&fixture(name)).unwrap().kind;
    assert!(matches!(kind("clip-a"), ModelKind::Clip(..)));
    assert!(matches!(kind("qformer-a"), ModelKind::Qformer(_)));
    assert!(matches!(kind("bert-a"), ModelKind::Bert(_)));
    assert!(matches!(kind("lm-opt"), ModelKind::Lm(_)));
    assert!(matches!(kind("lm-qwen2"), ModelKind::Lm(_)));
    let dev = Device::Cpu;
    assert!(matches!(
        Pipeline::load(&fixture("clip-a"), &dev).unwrap(),
        Pipeline::Clip(_)
    ));
    let q = Pipeline::load(&fixture("qformer-a"), &dev).unwrap();
    let e = q.into_clip("`vlalign embed`").err().unwrap().to_string();
    assert!(
        e.contains("qformer-a holds a BLIP-2 Q-Former model; `vlalign embed` needs a CLIP"),
        "{e}"
    );
    let e = load_err(&fixture("qformer-a"));
    assert!(e.contains("BLIP-2 Q-Former"), "{e}");
    let e = Pipeline::load(&fixture("bert-a"), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("holds a BERT model"), "{e}");

    let dir = scratch("kind-llama");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt_neox"}"#).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model_type `gpt_neox` is not supported") && e.contains("clip_vision_model"),
        "{e}"
    );
    // A language model is a model kind, but not one `embed` runs.
    let e = load_err(&fixture("lm-llama"));
    assert!(e.contains("holds a language model"), "{e}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}"#,
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("rotary scaling `llama3` is not supported"),
        "{e}"
    );
    let q = std::fs::read_to_string(fixture("qformer-a/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&q).unwrap();
    v["architectures"] = serde_json::json!(["Blip2Model"]);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("architecture `Blip2Model` is not supported"),
        "{e}"
    );
    assert!(matches!(kind("blip2-opt"), ModelKind::Blip2Lm(_)));
    let e = load_err(&fixture("blip2-llama"));
    assert!(
        e.contains("holds a BLIP-2 (Q-Former + language model) model"),
        "{e}"
    );
    let dir = scratch("kind-open-clip");
    std::fs::write(dir.join("open_clip_config.json"), "{}").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("open_clip"), "{e}");
}

#[test]
fn written_directory_round_trips() {
    let src = fixture("clip-a");
    let md = ModelDir::open(&src).unwrap();
    let (cfg, layout) = md.clip("the round trip").unwrap();
    // Trainable variables, randomly initialised, then overwritten with the fixture's values.
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Clip::new(vb, cfg, layout).unwrap();
    varmap.load(src.join("model.safetensors")).unwrap();
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("roundtrip-clip-a");
    let processor = ImageProcessor::from_file(&src.join("preprocessor_config.json")).unwrap();
    let files = ModelFiles {
        config: cfg.to_hf_json(),
        preprocessor: processor.to_hf_json(),
        tokenizer_json: CLIP_TOKENIZER_JSON,
        extra: &[],
    };
    save_model_dir(&out, &files, &tensors).unwrap();
    // Written twice: the second write replaces the first atomically.
    save_model_dir(&out, &files, &tensors).unwrap();
    let p = ClipPipeline::load(&out, &Device::Cpu).unwrap();
    assert_eq!(p.processor.as_ref().unwrap(), &processor);
    let r = reference("clip-a.reference.safetensors");
    let img = p.model.image_features(&r["pixel_values"]).unwrap();
    let d = max_abs_diff(&img, &r["image_features"]);
    assert!(d <= 1e-4, "{d}");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".roundtrip-clip-a")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left behind");
    println!("wrote {}", out.display());
}
