//! Training machinery on a tiny CLIP: gradients reach every tensor, accumulation is exact,
//! checkpoints resume bit-exactly, loaders skip and report corrupt samples, `train` survives
//! `kill -9`.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use common::{grad_norm, scratch, train};
use vlalign::data::batch::Batch;
use vlalign::data::image::ImageProcessor;
use vlalign::data::loader::{Augment, Loader, LoaderConfig, Source};
use vlalign::data::manifest::Entry;
use vlalign::data::text::TextTokenizer;
use vlalign::train::build::Run;
use vlalign::train::config::{ContrastiveLoss, TrainConfig};
use vlalign::train::task::Task;
use vlalign::train::trainer::RunOptions;

const TINY: &str = common::TINY_CLIP_TOML;

fn tiny() -> TrainConfig {
    TrainConfig::from_toml(TINY).unwrap()
}

/// The run of `cfg` and the first batch of its data.
fn run_and_batch(cfg: &TrainConfig) -> (Run, Batch) {
    let run = Run::new(cfg.clone(), &Device::Cpu).unwrap();
    let batch = run.loader().unwrap().next_batch().unwrap();
    (run, batch)
}

#[test]
fn every_trainable_tensor_gets_a_finite_nonzero_gradient() {
    for loss in [ContrastiveLoss::InfoNce, ContrastiveLoss::SigLip] {
        let mut cfg = tiny();
        cfg.train.loss = loss;
        let (mut run, batch) = run_and_batch(&cfg);
        let task = &mut run.task;
        let (grads, terms) = task.grads(&[batch], 0).unwrap();
        assert!(terms.total.is_finite());
        let vars = task.vars();
        assert!(vars.len() > 50, "{} variables", vars.len());
        let norm = |n: &str| -> f32 {
            grad_norm(
                grads
                    .get(n)
                    .unwrap_or_else(|| panic!("{loss:?}: no gradient for {n}")),
            )
        };
        for (name, _) in &vars {
            let n = norm(name);
            assert!(n.is_finite(), "{loss:?}: non-finite gradient for {name}");
            if name.ends_with("k_proj.bias") {
                // Invariant: a key bias shifts every score of a query row equally, and softmax
                // ignores such shifts, so its true gradient is zero (only rounding remains).
                let q = norm(&name.replace("k_proj", "q_proj"));
                assert!(
                    n < 1e-4 * q.max(1e-3),
                    "{loss:?}: {name} gradient {n} vs q_proj.bias {q}"
                );
            } else {
                assert!(n > 0.0, "{loss:?}: zero gradient for {name}");
            }
        }
    }
}

#[test]
fn accumulation_equals_the_large_batch_gradient() {
    let cfg = tiny();
    let (mut run, big) = run_and_batch(&cfg);
    let half = |lo: usize| big.rows(lo..lo + 4);
    let task = &mut run.task;
    let (g_big, l_big) = task.grads(std::slice::from_ref(&big), 0).unwrap();
    let (g_acc, l_acc) = task.grads(&[half(0), half(4)], 0).unwrap();
    assert!(
        (l_big.total - l_acc.total).abs() < 1e-5,
        "{} vs {}",
        l_big.total,
        l_acc.total
    );
    assert_eq!(g_big.len(), g_acc.len());
    for (name, g) in &g_big {
        let a = &g_acc[name];
        let d = (g - a)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s = g
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d <= 1e-5 + 1e-4 * s,
            "{name}: accumulated gradient off by {d} (scale {s})"
        );
    }
}

#[test]
fn resumed_training_is_bit_exact() {
    let cfg = tiny();
    let straight = scratch("run-straight");
    train(&cfg, &straight, false);
    let split = scratch("run-split");
    let mut first = cfg.clone();
    first.train.steps = 3;
    let r = train(&first, &split, false);
    assert_eq!(r.steps, 3);
    let r = train(&cfg, &split, true);
    assert_eq!((r.resumed_from, r.steps), (Some(3), 6));
    common::assert_same_weights(&straight, &split);
    // The optimiser state travelled too: the last checkpoints are identical.
    let opt =
        |d: &Path| std::fs::read(d.join("checkpoints/step-0000006/optimizer.safetensors")).unwrap();
    assert!(opt(&straight) == opt(&split));
    // metrics.jsonl has one line per step, none duplicated by the resume.
    let steps: Vec<u64> = std::fs::read_to_string(split.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    assert!(split.join("loss.png").is_file());
    // A fresh run into a directory that holds one is refused.
    let opts = RunOptions {
        run_dir: split.clone(),
        resume: false,
        progress: false,
        comm: vlalign::dist::single(),
    };
    let e = Run::new(cfg.clone(), &Device::Cpu)
        .unwrap()
        .train(&opts, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

fn save_png(p: &Path, seed: u8) {
    let data: Vec<u8> = (0..32 * 32 * 3)
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    image::save_buffer(p, &data, 32, 32, image::ExtendedColorType::Rgb8).unwrap();
}

fn tiny_loader(source: Source, batch: usize) -> Loader {
    let tok = TextTokenizer::word_level(&vlalign::data::shapes::vocabulary(), 16).unwrap();
    let cfg = LoaderConfig {
        batch_size: batch,
        workers: 2,
        prefetch: 2,
        seed: 1,
        augment: Augment::RandomResizedCrop { scale: (0.5, 1.0) },
        shuffle_buffer: 3,
        shard: (0, 1),
    };
    Loader::start(
        source,
        &cfg,
        ImageProcessor::clip_default(32),
        Arc::new(tok),
        0,
    )
    .unwrap()
}

#[test]
fn manifest_loader_skips_and_reports_bad_samples() {
    let dir = scratch("loader-manifest");
    let mut entries = Vec::new();
    for i in 0..6 {
        let p = dir.join(format!("{i}.png"));
        save_png(&p, i as u8 + 1);
        entries.push(Entry {
            image: p,
            caption: format!("a red circle {i}"),
            objects: None,
            noisy: None,
        });
    }
    std::fs::write(dir.join("bad.png"), b"not a png").unwrap();
    entries.push(Entry {
        image: dir.join("bad.png"),
        caption: "bad".into(),
        objects: None,
        noisy: None,
    });
    entries.push(Entry {
        image: dir.join("missing.png"),
        caption: "missing".into(),
        objects: None,
        noisy: None,
    });
    let m = dir.join("m.jsonl");
    vlalign::data::manifest::write_jsonl(&m, &dir, &entries).unwrap();
    let read = vlalign::data::manifest::read(&m).unwrap();
    assert_eq!(read.len(), 8);
    let mut loader = tiny_loader(Source::Manifest(Arc::new(read)), 4);
    // One epoch = 8 samples = 2 batches: 6 good, 2 skipped with their reasons.
    let (a, b) = (loader.next_batch().unwrap(), loader.next_batch().unwrap());
    assert_eq!(a.len() + b.len(), 6);
    let skipped: Vec<String> = a.skipped.iter().chain(&b.skipped).cloned().collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped.iter().any(|s| s.contains("bad.png"))
            && skipped.iter().any(|s| s.contains("missing.png"))
    );
    assert_eq!(b.position, 8);
    assert_eq!(a.pixels.len(), a.len() * 3 * 32 * 32);
    // CSV with the same files.
    let csv = dir.join("m.csv");
    let mut text = String::from("filepath,title\n");
    for i in 0..6 {
        text.push_str(&format!("{i}.png,\"a blue square, {i}\"\n"));
    }
    std::fs::write(&csv, text).unwrap();
    let read = vlalign::data::manifest::read(&csv).unwrap();
    let mut loader = tiny_loader(Source::Manifest(Arc::new(read)), 3);
    let b = loader.next_batch().unwrap();
    assert_eq!(b.len(), 3);
    assert!(b.captions.iter().all(|c| c.starts_with("a blue square, ")));
}

fn add_file(t: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    t.append_data(&mut h, name, bytes).unwrap();
}

#[test]
fn tar_shards_stream_and_skip_bad_samples() {
    let dir = scratch("loader-tar");
    let png = dir.join("x.png");
    save_png(&png, 3);
    let png = std::fs::read(&png).unwrap();
    for s in 0..2 {
        let f = std::fs::File::create(dir.join(format!("shard-{s:02}.tar"))).unwrap();
        let mut t = tar::Builder::new(f);
        for k in 0..4 {
            let key = format!("s{s}k{k}");
            add_file(&mut t, &format!("{key}.png"), &png);
            if s == 1 && k == 2 {
                continue; // no caption
            }
            if k == 3 {
                add_file(
                    &mut t,
                    &format!("{key}.json"),
                    br#"{"caption": "a green star"}"#,
                );
            } else {
                add_file(&mut t, &format!("{key}.txt"), b"a red circle");
            }
        }
        if s == 0 {
            add_file(&mut t, "broken.webp", b"garbage");
            add_file(&mut t, "broken.txt", b"a broken image");
        }
        t.finish().unwrap();
    }
    let pattern = format!("{}/shard-{{00..01}}.tar", dir.display());
    let shards = vlalign::data::webdataset::shards(&pattern).unwrap();
    assert_eq!(shards.len(), 2);
    let mut loader = tiny_loader(Source::Tar(shards), 3);
    // 9 samples per epoch: 7 good, one without caption, one undecodable.
    let mut good = 0;
    let mut skipped = Vec::new();
    let mut position = 0;
    while position < 9 {
        let b = loader.next_batch().unwrap();
        good += b.len();
        skipped.extend(b.skipped.clone());
        position = b.position;
        assert!(b
            .captions
            .iter()
            .all(|c| c == "a red circle" || c == "a green star"));
    }
    assert_eq!((good, skipped.len()), (7, 2), "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("no caption")));
    assert!(skipped.iter().any(|s| s.contains("broken")));
    let e = vlalign::data::webdataset::shards(&format!("{}/shard-{{00..02}}.tar", dir.display()))
        .unwrap_err();
    assert!(e.to_string().contains("shard-02.tar"), "{e}");
}

/// Two runs into one directory: the second is refused while the first holds the directory's
/// lock (an OS lock, so a killed run leaves none behind); they used to overwrite each other.
#[test]
fn one_writer_per_run_directory() {
    let dir = scratch("locked-run");
    std::fs::create_dir_all(&dir).unwrap();
    let held = std::fs::File::create(dir.join(".lock")).unwrap();
    held.try_lock().unwrap();
    let opts = RunOptions {
        run_dir: dir.clone(),
        resume: false,
        progress: false,
        comm: vlalign::dist::single(),
    };
    let e = Run::new(tiny(), &Device::Cpu)
        .unwrap()
        .train(&opts, None)
        .expect_err("a locked run directory is refused")
        .to_string();
    assert!(e.contains("in use by another vlalign run"), "{e}");
    drop(held);
    let mut cfg = tiny();
    cfg.train.steps = 1;
    let r = common::train(&cfg, &dir, false);
    assert_eq!(r.steps, 1, "free again once the holder is gone");
}

/// A manifest whose every image is missing (paths relative to the wrong folder, say) ends the
/// run with an error naming a cause once a whole epoch gave nothing usable; it used to spin.
/// The error of a tiny run over `source`, which must fail.
fn training_error(source: &Path, run_dir: &Path) -> String {
    let mut cfg = tiny();
    cfg.data.source = source.to_string_lossy().into_owned();
    let opts = RunOptions {
        run_dir: run_dir.to_path_buf(),
        resume: false,
        progress: false,
        comm: vlalign::dist::single(),
    };
    Run::new(cfg, &Device::Cpu)
        .unwrap()
        .train(&opts, None)
        .expect_err("training on unusable data must fail")
        .to_string()
}

#[test]
fn training_stops_when_no_sample_is_usable() {
    let dir = scratch("barren");
    let entries: Vec<Entry> = (0..20)
        .map(|i| Entry {
            image: dir.join(format!("missing-{i}.png")),
            caption: "a red circle".into(),
            objects: None,
            noisy: None,
        })
        .collect();
    let m = dir.join("m.jsonl");
    vlalign::data::manifest::write_jsonl(&m, &dir, &entries).unwrap();
    let t0 = std::time::Instant::now();
    let e = training_error(&m, &dir.join("run"));
    assert!(
        e.contains("no usable sample") && e.contains("missing-"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 60, "took {:?}", t0.elapsed());
    assert!(!dir.join("run/model").exists(), "nothing is written");
}

/// A tar shard of the given members (name, bytes).
fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *bytes).unwrap();
    }
    b.into_inner().unwrap()
}

/// Each of the probe's tar shards that used to spin forever ends with the no-usable-sample
/// error, naming why the samples were skipped.
#[test]
fn barren_tar_shards_end_with_a_clear_error() {
    let dir = scratch("barren-tar");
    let png = std::fs::read(common::fixture("images/tiny.png")).unwrap();
    let good = tar_of(&[("a.png", &png), ("a.txt", b"a red circle")]);
    let mut huge = tar::Header::new_gnu();
    huge.set_path("a.png").unwrap();
    huge.set_size(2 << 30);
    huge.set_cksum();
    let mut claims_2gib = huge.as_bytes().to_vec();
    claims_2gib.extend([7u8; 4096]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "only-captions",
            tar_of(&[("a.txt", b"x"), ("b.txt", b"y")]),
            "no image",
        ),
        (
            "only-images",
            tar_of(&[("a.png", &png), ("b.png", &png)]),
            "no caption",
        ),
        (
            "bad-json",
            tar_of(&[("a.png", &png), ("a.json", b"{not json")]),
            "no caption",
        ),
        (
            "corrupt-image",
            tar_of(&[("a.png", b"\x89PNG garbage"), ("a.txt", b"x")]),
            "not a readable image",
        ),
        (
            "text-named-tar",
            b"just some text, not a tar\n".repeat(40),
            "corrupt tar",
        ),
        ("truncated-header", good[..300].to_vec(), "corrupt tar"),
        ("claims-2gib", claims_2gib, "claims-2gib.tar:a"),
    ];
    for (name, bytes, why) in cases {
        let shard = dir.join(format!("{name}.tar"));
        std::fs::write(&shard, bytes).unwrap();
        let t0 = std::time::Instant::now();
        let e = training_error(&shard, &dir.join(format!("run-{name}")));
        println!("{name}: {:?}: {e}", t0.elapsed());
        assert!(
            e.contains("no usable sample") && e.contains(why),
            "{name}: {e}"
        );
        assert!(
            !e.contains("manifest"),
            "{name}: no manifest hint for tar shards: {e}"
        );
        assert!(
            t0.elapsed().as_secs() < 60,
            "{name} took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn train_survives_kill_minus_9_and_resumes() {
    let dir = scratch("kill9");
    let cfg_path = dir.join("tiny.toml");
    let mut cfg = tiny();
    cfg.train.steps = 600;
    cfg.train.checkpoint_every = 20;
    std::fs::write(&cfg_path, cfg.to_toml()).unwrap();
    let run = dir.join("run");
    let bin = env!("CARGO_BIN_EXE_vlalign");
    let mut child = std::process::Command::new(bin)
        .args([
            "train",
            "--config",
            cfg_path.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a checkpoint exists (mid-run, possibly mid-write of the next one).
    let t0 = std::time::Instant::now();
    while !run.join("last").exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "train",
            "--config",
            cfg_path.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--resume",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"], 600);
    let from = v["resumed_from"].as_u64().unwrap();
    assert!(
        (20..600).contains(&from),
        "killed at step {from}: not mid-run"
    );
    assert!(run.join("model/model.safetensors").is_file());
    // The finished model loads as a model directory.
    vlalign::infer::ClipPipeline::load(&run.join("model"), &Device::Cpu).unwrap();
}

#[test]
fn bad_config_is_a_one_line_error() {
    let dir = scratch("bad-config");
    let p = dir.join("c.toml");
    std::fs::write(
        &p,
        TINY.replace("lr = 1e-3", "lr = 1e-3\nlearning_rate = 3"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlalign"))
        .args([
            "train",
            "--config",
            p.to_str().unwrap(),
            "--out",
            dir.join("r").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("c.toml") && e.contains("learning_rate"), "{e}");
}

/// The tiny config with a ModifiedResNet image tower (`resnet_layers`).
fn tiny_resnet() -> TrainConfig {
    let mut cfg = tiny();
    let m = cfg.model.as_mut().unwrap();
    m.resnet_layers = Some([1, 1, 1, 1]);
    (m.patch_size, m.vision_layers, m.vision_mlp) = (0, 0, 0);
    (m.vision_width, m.vision_heads) = (8, 4);
    cfg
}

/// A ResNet CLIP trains: every parameter gets a gradient, BatchNorm's running statistics get
/// none but move with each batch, resuming is bit-exact (statistics included), and the model
/// directory it writes loads for inference.
#[test]
fn a_resnet_clip_trains_and_resumes_bit_exactly() {
    let cfg = tiny_resnet();
    let (mut run, batch) = run_and_batch(&cfg);
    let (grads, terms) = run.task.grads(&[batch], 0).unwrap();
    assert!(terms.total.is_finite());
    let vars = run.task.vars();
    let stats = |n: &str| n.ends_with("running_mean") || n.ends_with("running_var");
    assert!(vars
        .iter()
        .any(|(n, _)| n == "visual.layer4.0.bn3.running_var"));
    for (name, _) in &vars {
        match grads.get(name) {
            None => assert!(stats(name), "no gradient for {name}"),
            Some(g) => {
                assert!(!stats(name), "{name} is a statistic, not a parameter");
                let n = grad_norm(g);
                assert!(n.is_finite(), "{name}");
                assert!(
                    n > 0.0 || name.ends_with("k_proj.bias"),
                    "zero gradient for {name}"
                );
            }
        }
    }
    let moved = run
        .task
        .vars()
        .into_iter()
        .find(|(n, _)| n == "visual.bn1.running_mean")
        .unwrap()
        .1;
    assert!(
        grad_norm(moved.as_tensor()) > 0.0,
        "running mean moved from 0"
    );

    let straight = scratch("rn-straight");
    train(&cfg, &straight, false);
    let split = scratch("rn-split");
    let mut first = cfg.clone();
    first.train.steps = 3;
    train(&first, &split, false);
    train(&cfg, &split, true);
    common::assert_same_weights(&straight, &split);
    let p = vlalign::infer::ClipPipeline::load(&straight.join("model"), &Device::Cpu).unwrap();
    let img = p
        .embed_image_files(&[common::fixture("images/tiny.png")])
        .unwrap();
    assert_eq!(img.dims(), &[1, 16]);
}

/// `[finetune]` over a directory `vlalign train` wrote: the task starts with exactly that
/// directory's model (the same embeddings, bit for bit, as loading it for inference), ships
/// its tokenizer side file, and resumes bit-exactly like any run.
#[test]
fn fine_tuning_a_trained_directory_starts_from_its_weights() {
    let first = scratch("ft-source");
    let mut cfg = tiny();
    cfg.train.steps = 3;
    train(&cfg, &first, false);
    let src = first.join("model");
    let mut ft = tiny();
    ft.model = None;
    ft.finetune = Some(vlalign::train::config::FinetuneSpec { model: src.clone() });
    let ft = TrainConfig::from_toml(&ft.to_toml()).unwrap();

    let run = Run::new(ft.clone(), &Device::Cpu).unwrap();
    let start = run.task.as_clip().unwrap().pipeline().unwrap();
    let loaded = vlalign::infer::ClipPipeline::load(&src, &Device::Cpu).unwrap();
    let image = [common::fixture("images/tiny.png")];
    let texts = ["a red circle", "two blue squares"];
    for (a, b) in [
        (
            start.embed_image_files(&image).unwrap(),
            loaded.embed_image_files(&image).unwrap(),
        ),
        (
            start.embed_texts(&texts).unwrap(),
            loaded.embed_texts(&texts).unwrap(),
        ),
    ] {
        let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    }

    let straight = scratch("ft-straight");
    train(&ft, &straight, false);
    let side = "model/tokenizer_config.json";
    assert_eq!(
        std::fs::read(first.join(side)).unwrap(),
        std::fs::read(straight.join(side)).unwrap()
    );
    let split = scratch("ft-split");
    let mut half = ft.clone();
    half.train.steps = 3;
    train(&half, &split, false);
    train(&ft, &split, true);
    common::assert_same_weights(&straight, &split);
}

/// What cannot be fine-tuned is refused in one line: a Q-Former directory, a
/// missing directory, and a config that also builds a CLIP from `[model]` keys.
#[test]
fn fine_tuning_refuses_what_it_cannot_start_from() {
    let dir = scratch("ft-refusals");
    for (model, needle) in [
        (common::fixture("qformer-a"), "needs a CLIP"),
        (dir.join("absent"), "does not exist"),
    ] {
        let mut ft = tiny();
        ft.model = None;
        ft.finetune = Some(vlalign::train::config::FinetuneSpec { model });
        let e = Run::new(ft, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let both = format!("{TINY}\n[finetune]\nmodel = \"x\"\n");
    let e = TrainConfig::from_toml(&both).unwrap_err();
    assert!(e.contains("not several"), "{e}");
}

/// Mixed precision (`train.precision = "bf16"`) on clip-tiny (configs/clip-tiny.toml's model
/// and AdamW settings, both towers trained): 30 steps on one batch of 32 pairs, so that the loss
/// falls far in few steps, from the same seed in float32 and in bf16. The bf16 curve tracks the
/// float32 one within a stated tolerance: each step within 0.01 + 1% of the float32 loss (seen
/// here: at most 0.011, at step 2).
/// bfloat16 keeps 8 significant bits (a relative rounding of 2⁻⁹ ≈ 0.2% per value) and the two
/// runs' weights drift apart step by step, so they are not expected to agree more closely than
/// a few tenths of a percent early on; a cast in the wrong place (LayerNorm or softmax in
/// bfloat16, a gradient lost at a cast) shows as far more.
#[test]
fn bf16_loss_curve_tracks_float32_on_clip_tiny() {
    let preset = include_str!("../configs/clip-tiny.toml");
    let mut cfg = TrainConfig::from_toml(preset).unwrap();
    (cfg.data.workers, cfg.train.batch_size) = (1, 32);
    // Both learn the batch: from ln 32 ≈ 3.47 to below half of it.
    common::assert_bf16_tracks_f32(&cfg, 30, (0.01, 0.01), 0.5);
}

/// Gradient checkpointing (`train.grad_checkpointing`) recomputes each encoder layer in the
/// backward pass: the same loss and the same gradient for every trainable tensor as keeping the
/// activations (bit for bit: the recomputation runs the same kernels on the same values), for
/// both losses.
#[test]
fn checkpointed_layers_give_the_same_gradients() {
    for loss in [ContrastiveLoss::InfoNce, ContrastiveLoss::SigLip] {
        let mut cfg = tiny();
        cfg.train.loss = loss;
        let (mut plain, batch) = run_and_batch(&cfg);
        cfg.train.grad_checkpointing = true;
        let (mut ckpt, _) = run_and_batch(&cfg);
        let (ga, la) = plain.task.grads(std::slice::from_ref(&batch), 0).unwrap();
        let (gb, lb) = ckpt.task.grads(std::slice::from_ref(&batch), 0).unwrap();
        assert_eq!(la.total.to_bits(), lb.total.to_bits(), "{loss:?}");
        assert_eq!(ga.len(), gb.len());
        let bits = |t: &candle_core::Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for (name, g) in &ga {
            assert!(bits(g) == bits(&gb[name]), "{loss:?}: {name} differs");
        }
    }
}

/// `train.precision = "bf16"` and `train.grad_checkpointing` outside CLIP-with-a-ViT training
/// are refused at load, by name.
#[test]
fn bf16_is_refused_where_it_does_not_apply() {
    let resnet = tiny_resnet()
        .to_toml()
        .replace("precision = \"f32\"", "precision = \"bf16\"");
    let e = TrainConfig::from_toml(&resnet).unwrap_err();
    assert!(e.contains("train.precision") && e.contains("ResNet"), "{e}");
    let resnet = tiny_resnet()
        .to_toml()
        .replace("grad_checkpointing = false", "grad_checkpointing = true");
    let e = TrainConfig::from_toml(&resnet).unwrap_err();
    assert!(
        e.contains("train.grad_checkpointing") && e.contains("ResNet"),
        "{e}"
    );
    // Fine-tuning a ResNet CLIP directory: known only once the directory is read.
    let rn = scratch("precision-resnet");
    let mut cfg = tiny_resnet();
    cfg.set_steps(1).unwrap();
    train(&cfg, &rn, false);
    for (bf16, needle) in [
        (true, "train.precision"),
        (false, "train.grad_checkpointing"),
    ] {
        let mut ft = tiny();
        ft.model = None;
        ft.finetune = Some(vlalign::train::config::FinetuneSpec {
            model: rn.join("model"),
        });
        match bf16 {
            true => ft.train.precision = vlalign::train::config::Precision::Bf16,
            false => ft.train.grad_checkpointing = true,
        }
        let e = Run::new(ft, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains(needle) && e.contains("ResNet"), "{e}");
    }
    let e = TrainConfig::from_toml(&TINY.replace("[train]\n", "[train]\nprecision = \"f16\"\n"))
        .unwrap_err();
    assert!(e.contains("f16"), "{e}");
}

/// Host reads per step (metrics.jsonl's `host_reads_per_step`, counted by nn::host; on a GPU
/// each read waits for the device): a CLIP step reads its loss once — the gradient-norm clip
/// stays on the device — and a Q-Former step reads its ITC similarities (for the hard
/// negatives) and its three loss terms together, for any number of layers or shards. Each run
/// is its own `vlalign train` process, so other tests' reads do not count.
#[test]
fn a_training_step_reads_the_device_once_per_need() {
    let dir = scratch("host-reads");
    let q = format!("{}grad_clip = 1.0\n", common::tiny_qformer_toml());
    for (name, toml, reads) in [("clip", TINY.to_string(), 1.0), ("qformer", q, 2.0)] {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let run = dir.join(name);
        common::train_cli(&cfg, &run);
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let seen: Vec<f64> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|m| m.get("loss").is_some())
            .map(|m| m["host_reads_per_step"].as_f64().unwrap())
            .collect();
        assert!(seen.len() >= 4, "{name}: {metrics}");
        assert!(seen.iter().all(|&r| r == reads), "{name}: {seen:?}");
    }
}
