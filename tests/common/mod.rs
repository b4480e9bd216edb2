//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod http;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// Tensors of a `*.reference.safetensors` fixture.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).expect("reference fixture")
}

/// Largest |a − b| over all elements, in float32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest |a − b| over the positions `[b, t]` of `[B, T, ...]` tensors where `mask[b][t]` is
/// 1 (a padding position's output is never read).
pub fn max_abs_diff_where(a: &Tensor, b: &Tensor, mask: &[Vec<u32>]) -> f32 {
    let mut worst = 0f32;
    for (r, row) in mask.iter().enumerate() {
        for (t, _) in row.iter().enumerate().filter(|(_, &m)| m == 1) {
            let x = a.get(r).unwrap().get(t).unwrap();
            let y = b.get(r).unwrap().get(t).unwrap();
            worst = worst.max(max_abs_diff(&x, &y));
        }
    }
    worst
}

/// Greedy generation of `n` tokens (no stop token) from each row of `embeds`.
pub fn greedy_ids(
    lm: &vlalign::models::lm::CausalLm,
    embeds: &Tensor,
    mask: &[Vec<u32>],
    n: usize,
) -> Vec<Vec<u32>> {
    use vlalign::infer::lm_generate::{generate, GenerationConfig};
    let history = vec![Vec::new(); mask.len()];
    let cfg = GenerationConfig::greedy(n, vec![]);
    generate(lm, embeds, mask, &history, &cfg, &mut [])
        .unwrap()
        .into_iter()
        .map(|g| g.ids)
        .collect()
}

/// Rows of an integer `[B, T]` tensor as u32.
pub fn rows_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

/// A fresh directory under the target dir for a test's outputs.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The weights of `RUN/model`.
pub fn run_weights(dir: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model/model.safetensors"), &Device::Cpu).unwrap()
}

/// Asserts two runs ended with bit-identical weights.
pub fn assert_same_weights(a: &std::path::Path, b: &std::path::Path) {
    let (a, b) = (run_weights(a), run_weights(b));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(x == y, "{k} differs after resuming");
    }
}

/// Runs the `vlalign` binary of this build.
pub fn vlalign(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vlalign"))
        .args(args)
        .output()
        .unwrap()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The one JSON object a successful `--json` run prints.
pub fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON object")
}

/// A user error: exit code 1 and exactly one `error:` line on stderr, containing `needle`, and
/// no panic.
pub fn assert_user_error(o: &std::process::Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {e}");
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {e:?}");
    assert!(
        errors[0].contains(needle),
        "{needle:?} not in the error line {e:?}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

/// Largest relative difference between two gradient sets over the same tensors (|a − b| over
/// max |a|, the scale floored at 1e-3).
pub fn grads_rel_diff(a: &vlalign::train::optim::Grads, b: &vlalign::train::optim::Grads) -> f32 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same tensors get gradients"
    );
    a.iter()
        .map(|(k, g)| {
            let d = (g - &b[k]).unwrap().abs().unwrap().max_all().unwrap();
            let scale = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            d.to_scalar::<f32>().unwrap() / scale.max(1e-3)
        })
        .fold(0.0, f32::max)
}

/// The L2 norm of one gradient.
pub fn grad_norm(g: &Tensor) -> f32 {
    g.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Trains `cfg` into `dir` on the CPU (resuming when asked), as `vlalign train` does.
pub fn train(
    cfg: &vlalign::train::config::TrainConfig,
    dir: &std::path::Path,
    resume: bool,
) -> vlalign::train::trainer::RunReport {
    let opts = vlalign::train::trainer::RunOptions {
        run_dir: dir.to_path_buf(),
        resume,
        progress: false,
        comm: vlalign::dist::single(),
    };
    vlalign::train::build::Run::new(cfg.clone(), &Device::Cpu)
        .unwrap()
        .train(&opts, None)
        .unwrap()
}

/// [`assert_user_error`], and stderr holds nothing else.
pub fn assert_only_error(o: &std::process::Output, needle: &str) {
    assert_user_error(o, needle);
    assert_eq!(stderr(o).trim().lines().count(), 1, "{}", stderr(o));
}

/// CRC-32 (ISO 3309, as PNG chunks use) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A 1-bit greyscale PNG that claims `w`×`h`: signature, IHDR and an empty IDAT (the header a
/// decoder reads before any pixel), then IEND.
pub fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([1, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (&b"IHDR"[..], ihdr),
        (b"IDAT", Vec::new()),
        (b"IEND", Vec::new()),
    ] {
        out.extend((data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend(&data);
        out.extend(&chunk);
        out.extend(crc32(&chunk).to_be_bytes());
    }
    out
}

/// Trains a tiny Q-Former with an ITG head for 2 steps on shapes, over the clip-a fixture's
/// vision tower, with `vlalign train` into `dir/run`; its model directory.
pub fn train_tiny_qformer(dir: &std::path::Path) -> PathBuf {
    let cfg = dir.join("q.toml");
    std::fs::write(
        &cfg,
        format!(
            "[qformer]\nvision_model = \"{}\"\nhidden_size = 32\nnum_hidden_layers = 2\nnum_attention_heads = 4\n\
             intermediate_size = 64\ncross_attention_frequency = 1\nnum_query_tokens = 4\nembed_dim = 16\n\
             max_text_len = 24\ntokenizer = \"shapes\"\n[data]\nsource = \"shapes\"\n[train]\nsteps = 2\n\
             batch_size = 4\nlr = 1e-3\nwarmup_steps = 1\nweight_decay = 0.05\nseed = 1\ncheckpoint_every = 2\n",
            fixture("clip-a").display()
        ),
    )
    .unwrap();
    let out = train_cli(&cfg, &dir.join("run"));
    PathBuf::from(out["model_dir"].as_str().unwrap())
}

/// `vlalign train --config CONFIG --out RUN --json` in a process of its own; its JSON report.
pub fn train_cli(config: &std::path::Path, run: &std::path::Path) -> serde_json::Value {
    json(&vlalign(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--json",
    ]))
}

/// The tiny CLIP config the training tests share (tests/training.rs, tests/distill.rs).
pub const TINY_CLIP_TOML: &str = r#"
[model]
image_size = 32
patch_size = 8
vision_width = 32
vision_layers = 2
vision_heads = 2
vision_mlp = 64
text_width = 32
text_layers = 2
text_heads = 2
text_mlp = 64
context_length = 32
projection_dim = 16
tokenizer = "shapes"
[data]
source = "shapes"
workers = 2
[train]
steps = 6
batch_size = 8
lr = 1e-3
warmup_steps = 2
weight_decay = 0.1
grad_clip = 1.0
seed = 7
checkpoint_every = 3
log_every = 1
"#;

/// The tiny Q-Former config over the clip-a fixture's tower that the Q-Former training tests
/// share (tests/qformer_training.rs, tests/distill.rs).
pub fn tiny_qformer_toml() -> String {
    format!(
        r#"
[qformer]
vision_model = "{}"
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
intermediate_size = 64
cross_attention_frequency = 2
num_query_tokens = 4
embed_dim = 16
max_text_len = 24
tokenizer = "shapes"
[data]
source = "shapes"
workers = 1
[train]
steps = 4
batch_size = 6
lr = 1e-3
warmup_steps = 1
weight_decay = 0.05
seed = 11
checkpoint_every = 2
log_every = 1
"#,
        fixture("clip-a").display()
    )
}

/// Trains `cfg` into `dir` on `n` thread ranks; every rank's report, in rank order.
pub fn train_ranks(
    cfg: &vlalign::train::config::TrainConfig,
    dir: &std::path::Path,
    n: usize,
    resume: bool,
) -> Vec<vlalign::train::trainer::RunReport> {
    let handles: Vec<_> = vlalign::dist::threads::ThreadComm::group(n)
        .into_iter()
        .map(|c| {
            let (cfg, dir) = (cfg.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                let opts = vlalign::train::trainer::RunOptions {
                    run_dir: dir,
                    resume,
                    progress: false,
                    comm: std::sync::Arc::new(c),
                };
                vlalign::train::build::Run::new(cfg, &Device::Cpu)?.train(&opts, None)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

/// How far two runs' weights are apart: the largest |a − b| of any element, the tensor it is
/// in, and the fraction of all elements that differ by more than 1e-6.
pub fn weight_gap(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f32, String, f64) {
    assert_eq!(a.len(), b.len());
    let (mut worst, mut name, mut over, mut total) = (0f32, String::new(), 0usize, 0usize);
    for (k, t) in a {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in x.iter().zip(&y) {
            let d = (p - q).abs();
            over += (d > 1e-6) as usize;
            if d > worst {
                (worst, name) = (d, k.clone());
            }
        }
        total += x.len();
    }
    (worst, name, over as f64 / total as f64)
}

/// Asserts that a run on ranks ended where one process did. Why not bit-equal: the ranks add
/// their partial gradients, one process adds per-sample terms in another order, and float32
/// rounds each order differently (~1e-7 relative). AdamW divides by √v, so where the true
/// gradient is ~0 (a key bias: softmax ignores a shift of a whole score row; a unit that never
/// activates) the step follows the rounding noise, up to lr either way. Hence: no element
/// further apart than 5e-5 (5% of one step at lr 1e-3), and at most 0.1% of the elements
/// further than 1e-6. Measured on this machine: at most 1.4e-5 (one element of the Q-Former's query FFN), and
/// ≤ 0.06% over 1e-6 (all in key biases, and that element).
pub fn assert_same_run(what: &str, one: &std::path::Path, ranks: &std::path::Path) {
    let (worst, name, frac) = weight_gap(&run_weights(one), &run_weights(ranks));
    eprintln!(
        "{what}: weights max |diff| {worst:e} ({name}), {:.3}% over 1e-6",
        frac * 100.0
    );
    assert!(worst < 5e-5, "{what}: {name} off by {worst}");
    assert!(frac < 1e-3, "{what}: {:.3}% off by > 1e-6", frac * 100.0);
}

/// Mixed precision against float32 (`train.precision`): the task of `cfg` trained `steps` AdamW
/// steps (`cfg`'s settings, lr 1e-3) on its first batch over and over, from the same seed in
/// float32 and in bf16. Asserts every bf16 loss within `abs + rel × the float32 loss`, both
/// curves ending below `learned ×` their start, and the two not equal bit for bit (the bf16
/// products did run).
pub fn assert_bf16_tracks_f32(
    cfg: &vlalign::train::config::TrainConfig,
    steps: u64,
    (abs, rel): (f32, f32),
    learned: f32,
) {
    use vlalign::train::config::Precision;
    use vlalign::train::optim::{AdamW, AdamWConfig};
    use vlalign::train::task::Task;
    let curve = |precision: Precision| -> Vec<f32> {
        let mut cfg = cfg.clone();
        cfg.train.precision = precision;
        let run = vlalign::train::build::Run::new(cfg.clone(), &Device::Cpu).unwrap();
        let batch = run.loader().unwrap().next_batch().unwrap();
        let mut task = run.task;
        let mut opt = AdamW::new(task.vars(), AdamWConfig::of(&cfg.train)).unwrap();
        (0..steps)
            .map(|step| {
                let (grads, terms) = task.grads(std::slice::from_ref(&batch), step).unwrap();
                opt.step(&grads, 1e-3).unwrap();
                task.after_step().unwrap();
                terms.total
            })
            .collect()
    };
    let (a, b) = (curve(Precision::F32), curve(Precision::Bf16));
    eprintln!("f32  {a:.4?}\nbf16 {b:.4?}");
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= abs + rel * x,
            "step {}: f32 {x} bf16 {y}",
            step + 1
        );
    }
    let (first, last) = (0, a.len() - 1);
    assert!(
        a[last] < learned * a[first] && b[last] < learned * b[first],
        "did not learn: {a:?} {b:?}"
    );
    assert!(a != b, "the bf16 run gave the float32 losses bit for bit");
}
