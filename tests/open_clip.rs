//! open_clip model directories against open_clip 3.3 itself (fixtures from
//! tools/reference/make_open_clip_fixtures.py, loaded back through open_clip's `local-dir:`
//! loader): tokenizer ids, eval preprocessing, normalised image and text features and logits of
//! two tiny random ViT CLIPs on real photos — one with quick_gelu, a logit_bias and a bicubic
//! crop, one with GELU, float16 storage, eps 1e-6 and a bilinear squash; `vlalign convert` to
//! transformers' layout; unsupported options refused by name.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{assert_user_error, fixture, max_abs_diff, reference, rows_u32, scratch, vlalign};
use vlalign::data::image::load_rgb;
use vlalign::infer::ClipPipeline;
use vlalign::models::ModelDir;

const TOL: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Inputs {
    images: Vec<String>,
    texts: Vec<String>,
}

fn inputs(name: &str) -> (Vec<PathBuf>, Vec<String>) {
    let raw = std::fs::read_to_string(fixture(&format!("{name}/inputs.json"))).unwrap();
    let i: Inputs = serde_json::from_str(&raw).unwrap();
    let images = i.images.iter().map(|n| fixture(n)).collect();
    (images, i.texts)
}

/// exp(logit_scale) · images · textsᵀ (+ logit_bias), from a pipeline's model.
fn logits(p: &ClipPipeline, img: &Tensor, txt: &Tensor) -> Tensor {
    let mut l = p.model.logits_per_image(img, txt).unwrap();
    if let Some(b) = &p.model.logit_bias {
        l = l.broadcast_add(b).unwrap();
    }
    l
}

fn check(name: &str) {
    let dir = fixture(name);
    let r = reference(&format!("{name}.reference.safetensors"));
    let (images, texts) = inputs(name);
    let p = ClipPipeline::load(&dir, &Device::Cpu).unwrap();

    // Token ids: open_clip pads with 0 after the end-of-text token, the bundled tokenizer with
    // the end-of-text id; up to and including the first end-of-text they are the same.
    let want_ids = rows_u32(&r["input_ids"]);
    let got = p
        .tokenizer
        .as_ref()
        .unwrap()
        .encode(&texts)
        .unwrap()
        .batch
        .ids;
    for (i, (g, w)) in got.iter().zip(&want_ids).enumerate() {
        let end = w.iter().position(|&t| t == 49407).unwrap();
        assert_eq!(g[..=end], w[..=end], "{name} text {i} ids");
    }

    // Preprocessing: the same 8-bit resize and crop (Pillow's resampler), float steps to 1e-6.
    let proc = p.processor.as_ref().unwrap();
    let mut px = Vec::new();
    for path in &images {
        let (v, (h, w)) = proc.preprocess(&load_rgb(path).unwrap()).unwrap();
        px.push(Tensor::from_vec(v, (3, h, w), &Device::Cpu).unwrap());
    }
    let px = Tensor::stack(&px, 0).unwrap();
    let d_px = max_abs_diff(&px, &r["pixel_values"]);
    println!("{name} pixel_values: max abs diff {d_px:.3e}");
    assert!(d_px <= 1e-5, "{name} pixel_values: {d_px:e}");

    let img = p.embed_image_files(&images).unwrap();
    let txt = p.embed_texts(&texts).unwrap();
    let l = logits(&p, &img, &txt);
    for (what, got, want) in [
        ("image_features", &img, "image_features"),
        ("text_features", &txt, "text_features"),
        ("logits", &l, "logits"),
    ] {
        let d = max_abs_diff(got, &r[want]);
        println!("{name} {what}: max abs diff {d:.3e}");
        assert!(d <= TOL, "{name} {what}: max abs diff {d:e} > {TOL:e}");
    }
}

#[test]
fn open_clip_a_quick_gelu_logit_bias_matches_open_clip() {
    check("open-clip-a");
}

#[test]
fn open_clip_b_float16_gelu_squash_matches_open_clip() {
    check("open-clip-b");
}

#[test]
fn open_clip_modified_resnet_matches_open_clip() {
    check("open-clip-rn");
}

/// A ResNet CLIP has no transformers twin: `convert` says so.
#[test]
fn convert_refuses_a_resnet() {
    let o = vlalign(&[
        "convert",
        "--from",
        fixture("open-clip-rn").to_str().unwrap(),
        "--to",
        scratch("open-clip-convert-rn").join("x").to_str().unwrap(),
    ]);
    assert_user_error(&o, "no transformers twin");
}

/// `vlalign convert` writes a transformers CLIPModel directory whose features on the same
/// pixels and texts are open_clip's (transformers itself loading it is checked by
/// tools/reference/check_model_dir.py; see the issue note).
#[test]
fn convert_writes_an_hf_directory_with_the_same_features() {
    let out = scratch("open-clip-convert").join("hf-a");
    let o = vlalign(&[
        "convert",
        "--from",
        fixture("open-clip-a").to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("logit_bias"));
    let md = ModelDir::open(&out).unwrap();
    assert!(md.open_clip().is_none(), "written in the HF layout");
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let r = reference("open-clip-a.reference.safetensors");
    let (_, texts) = inputs("open-clip-a");
    let p = ClipPipeline::load(&out, &Device::Cpu).unwrap();
    let img = vlalign::nn::ops::l2_normalize(&p.model.image_features(&r["pixel_values"]).unwrap())
        .unwrap();
    let txt = p.embed_texts(&texts).unwrap();
    for (what, got) in [("image_features", &img), ("text_features", &txt)] {
        let d = max_abs_diff(got, &r[what]);
        assert!(d <= TOL, "converted {what}: {d:e}");
    }
    // A second conversion to the same place is refused rather than overwriting.
    let again = vlalign(&[
        "convert",
        "--from",
        fixture("open-clip-a").to_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_user_error(&again, "exists");
    // And an HF directory is not an open_clip one.
    let hf = vlalign(&[
        "convert",
        "--from",
        out.to_str().unwrap(),
        "--to",
        scratch("open-clip-convert-2").join("x").to_str().unwrap(),
    ]);
    assert_user_error(&hf, "not an open_clip directory");
}

/// A copy of open-clip-a whose config has `edit` applied.
fn variant(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = scratch(name);
    let src = fixture("open-clip-a");
    for f in ["open_clip_model.safetensors", "open_clip_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let path = dir.join("open_clip_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

#[test]
fn unsupported_open_clip_options_are_refused_by_name() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "oc-resnet",
            Box::new(|c| c["model_cfg"]["vision_cfg"]["layers"] = serde_json::json!([3, 4, 6, 3])),
            // A ResNet config over ViT weights: the first tensor that does not fit is named.
            "visual.conv1.weight",
        ),
        (
            "oc-ls",
            Box::new(|c| c["model_cfg"]["vision_cfg"]["ls_init_value"] = 1e-4.into()),
            "vision_cfg.ls_init_value",
        ),
        (
            "oc-timm",
            Box::new(|c| c["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_base".into()),
            "timm_model_name",
        ),
        (
            "oc-avgpool",
            Box::new(|c| c["model_cfg"]["vision_cfg"]["pool_type"] = "avg".into()),
            "pool_type",
        ),
        (
            "oc-hf-text",
            Box::new(|c| c["model_cfg"]["text_cfg"]["hf_model_name"] = "roberta-base".into()),
            "hf_model_name",
        ),
        (
            "oc-unknown",
            Box::new(|c| c["model_cfg"]["vision_cfg"]["qk_norm"] = true.into()),
            "vision_cfg.qk_norm",
        ),
        (
            "oc-resize",
            Box::new(|c| c["preprocess_cfg"]["resize_mode"] = "longest".into()),
            "resize_mode",
        ),
        (
            "oc-hf-tokenizer",
            Box::new(|c| {
                c["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "bert-base-uncased".into()
            }),
            "never downloads",
        ),
    ];
    for (name, edit, needle) in cases {
        let dir = variant(name, edit);
        let o = vlalign(&["embed", "--model", dir.to_str().unwrap(), "--text", "a cat"]);
        assert_user_error(&o, needle);
    }
    // Pickle only: named, never read.
    let dir = variant("oc-pickle", |_| {});
    std::fs::rename(
        dir.join("open_clip_model.safetensors"),
        dir.join("open_clip_pytorch_model.bin"),
    )
    .unwrap();
    let o = vlalign(&["embed", "--model", dir.to_str().unwrap(), "--text", "a cat"]);
    assert_user_error(&o, "never pickle");
    // A tensor the config's model does not have.
    let dir = variant("oc-extra", |_| {});
    let w = dir.join("open_clip_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    tensors.insert(
        "visual.attnpool.c_proj.weight".into(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &w).unwrap();
    let o = vlalign(&["embed", "--model", dir.to_str().unwrap(), "--text", "a cat"]);
    assert_user_error(&o, "visual.attnpool.c_proj.weight");
}

/// An open_clip ViT serves as a Q-Former's frozen image encoder: the tower's tensors under HF
/// names, the packed attention split (q = the first third of `in_proj_weight`).
#[test]
fn an_open_clip_vit_is_a_frozen_qformer_tower() {
    let dir = fixture("open-clip-a");
    let (cfg, frozen) =
        vlalign::models::qformer::clip_tower::frozen_clip_vision(&dir, 1, &Device::Cpu).unwrap();
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers), (64, 1));
    let stored =
        candle_core::safetensors::load(dir.join("open_clip_model.safetensors"), &Device::Cpu)
            .unwrap();
    let packed = &stored["visual.transformer.resblocks.0.attn.in_proj_weight"];
    let q = &frozen["vision_model.encoder.layers.0.self_attn.q_proj.weight"];
    assert_eq!(max_abs_diff(q, &packed.narrow(0, 0, 64).unwrap()), 0.0);
    assert!(!frozen.contains_key("vision_model.encoder.layers.1.mlp.fc1.weight"));
    assert!(!frozen.keys().any(|k| k.starts_with("text_model")));
    let e = vlalign::models::qformer::clip_tower::frozen_clip_vision(
        &fixture("open-clip-rn"),
        1,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("ResNet image tower"), "{e}");
}

/// `vlalign retrieve` ranks a folder by CLIP cosine: the scores are open_clip's
/// image · text features, and `--rerank itm` (Q-Former only) is refused.
#[test]
fn retrieve_ranks_by_open_clip_cosine() {
    let r = reference("open-clip-a.reference.safetensors");
    let (images, texts) = inputs("open-clip-a");
    let dir = scratch("open-clip-retrieve");
    for (i, p) in images.iter().enumerate() {
        let ext = p.extension().unwrap().to_str().unwrap();
        std::fs::copy(p, dir.join(format!("img{i}.{ext}"))).unwrap();
    }
    let model = fixture("open-clip-a");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "retrieve",
            "--model",
            model.to_str().unwrap(),
            "--images",
            dir.to_str().unwrap(),
            "--query",
            texts[0].as_str(),
            "--top",
            "10",
            "--json",
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let a = args(&[]);
    let o = vlalign(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", common::stderr(&o));
    let want = r["image_features"]
        .matmul(&r["text_features"].narrow(0, 0, 1).unwrap().t().unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let results = common::json(&o)["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), images.len());
    let mut last = f32::INFINITY;
    for res in results {
        let name = res["image"].as_str().unwrap();
        let i: usize = name.rsplit("img").next().unwrap()[..1].parse().unwrap();
        let score = res["score"].as_f64().unwrap() as f32;
        assert!(
            (score - want[i]).abs() <= TOL,
            "{name}: {score} vs {}",
            want[i]
        );
        assert!(score <= last, "sorted best first");
        last = score;
    }
    let a = args(&["--rerank", "itm"]);
    let o = vlalign(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_user_error(&o, "needs a Q-Former");
}

/// The ResNet's training form against open_clip's `model.train()`: BatchNorm normalises with the
/// batch's statistics, and the running statistics it leaves behind (momentum 0.1, unbiased
/// variance) are PyTorch's, in the stem, a shortcut and the last block.
#[test]
fn resnet_training_form_matches_open_clip_train_mode() {
    let dir = fixture("open-clip-rn");
    let r = reference("open-clip-rn.reference.safetensors");
    let md = ModelDir::open(&dir).unwrap();
    let (cfg, layout) = md.clip("the test").unwrap();
    let stored = md.weights().unwrap().all(DType::F32, &Device::Cpu).unwrap();
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = vlalign::models::clip::Clip::new(vb, cfg, layout).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        var.set(&stored[name]).unwrap();
    }
    let feats = model
        .image_features_train(&r["pixel_values"], true)
        .unwrap();
    let d = max_abs_diff(&feats, &r["train_image_features"]);
    println!("open-clip-rn train_image_features: max abs diff {d:.3e}");
    assert!(d <= TOL, "train_image_features: {d:e}");
    let data = varmap.data().lock().unwrap();
    for key in [
        "visual.bn1",
        "visual.layer2.0.downsample.1",
        "visual.layer4.0.bn3",
    ] {
        for stat in ["running_mean", "running_var"] {
            let got = data[&format!("{key}.{stat}")].as_tensor();
            let d = max_abs_diff(got, &r[&format!("train_{stat}/{key}")]);
            println!("{key}.{stat} after one training batch: max abs diff {d:.3e}");
            assert!(d <= 1e-5, "{key}.{stat}: {d:e}");
        }
    }
}

/// `[finetune]` over an open_clip directory in a config, as a user writes it.
fn finetune_config(dir: &std::path::Path, loss: &str) -> vlalign::train::config::TrainConfig {
    vlalign::train::config::TrainConfig::from_toml(&format!(
        "[finetune]\nmodel = {:?}\n[data]\nsource = \"shapes\"\nworkers = 1\n\
         [train]\nsteps = 2\nbatch_size = 4\nlr = 1e-3\nwarmup_steps = 0\n\
         weight_decay = 0.1\ncheckpoint_every = 2\nloss = {loss:?}\n",
        dir.display()
    ))
    .unwrap()
}

/// Fine-tuning starts from the checkpoint: before any step, the task's model gives open_clip's
/// own features for the fixture's images and texts (ViT with a SigLIP bias, and the ResNet with
/// its running statistics); after two steps the written transformers-layout directory loads,
/// and has moved. Under InfoNCE the stored `logit_bias` is kept untrained, as open_clip keeps
/// the unused parameter; under SigLIP it trains.
#[test]
fn fine_tuning_starts_from_the_open_clip_weights() {
    for name in ["open-clip-a", "open-clip-rn"] {
        let dir = fixture(name);
        let r = reference(&format!("{name}.reference.safetensors"));
        let (images, texts) = inputs(name);
        let cfg = finetune_config(&dir, "infonce");
        let run = vlalign::train::build::Run::new(cfg.clone(), &Device::Cpu).unwrap();
        let p = run.task.as_clip().unwrap().pipeline().unwrap();
        let img = p.embed_image_files(&images).unwrap();
        let txt = p.embed_texts(&texts).unwrap();
        for (what, got) in [("image_features", &img), ("text_features", &txt)] {
            let d = max_abs_diff(got, &r[what]);
            println!("{name} fine-tuning start, {what}: max abs diff {d:.3e}");
            assert!(d <= TOL, "{name} {what}: {d:e}");
        }

        let out = scratch(&format!("finetune-{name}"));
        common::train(&cfg, &out, false);
        assert!(out.join("model/config.json").is_file());
        let tuned = ClipPipeline::load(&out.join("model"), &Device::Cpu).unwrap();
        let moved = max_abs_diff(
            &tuned.embed_image_files(&images).unwrap(),
            &r["image_features"],
        );
        assert!(moved > 1e-4, "{name}: two steps at lr 1e-3 moved nothing");
        let stored = md_tensors(&dir);
        let written = common::run_weights(&out);
        assert_eq!(
            stored.keys().collect::<std::collections::BTreeSet<_>>(),
            written.keys().collect(),
            "{name}: the fine-tuned directory holds the same tensors"
        );
        if let Some(bias) = stored.get("logit_bias") {
            assert_eq!(max_abs_diff(bias, &written["logit_bias"]), 0.0);
            let siglip = scratch(&format!("finetune-{name}-siglip"));
            common::train(&finetune_config(&dir, "siglip"), &siglip, false);
            let trained = &common::run_weights(&siglip)["logit_bias"];
            assert!(
                max_abs_diff(bias, trained) > 0.0,
                "SigLIP trains logit_bias"
            );
        }
    }
}

/// Every tensor of a model directory, under the names vlalign's model uses.
fn md_tensors(dir: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    let md = ModelDir::open(dir).unwrap();
    md.weights().unwrap().all(DType::F32, &Device::Cpu).unwrap()
}
