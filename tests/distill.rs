//! Momentum distillation (ALBEF §3.3, BLIP's image-id targets): the loss, its targets and
//! gradients, the queue update and the EMA against ALBEF's and BLIP's own formulas in PyTorch
//! (tools/reference/make_distill_fixtures.py, float64); then in training — accumulation stays
//! exact, every tensor learns, and a resumed run is bit-identical, momentum state included.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs_diff, reference, scratch, train};
use vlalign::objectives::distill::{distilled_itc_loss, hard_targets, soft_targets};
use vlalign::train::build::Run;
use vlalign::train::config::{DistillSpec, TrainConfig};
use vlalign::train::distill::{Distillation, FeatureQueues};
use vlalign::train::task::Task;

fn ids(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64).unwrap().to_vec1().unwrap()
}

/// ALBEF's and BLIP's ITA with distillation: targets, loss and every gradient to ~1e-12.
#[test]
fn distilled_loss_matches_albef_and_blip() {
    let r = reference("distill.reference.safetensors");
    for (case, same_image) in [("albef", false), ("blip", true)] {
        let g = |k: &str| r[&format!("{case}/{k}")].clone();
        let batch_ids: Vec<u64> = ids(&g("idx")).iter().map(|&i| i as u64).collect();
        let queue_ids: Vec<Option<u64>> = ids(&g("idx_queue"))
            .iter()
            .map(|&i| (i >= 0).then_some(i as u64))
            .collect();
        let hard = hard_targets(&batch_ids, &queue_ids, same_image, &Device::Cpu).unwrap();
        // ALBEF keeps its queues as [D, Q]; vlalign as rows [Q, D].
        let image_cols = Tensor::cat(&[g("image_m"), g("image_queue").t().unwrap()], 0).unwrap();
        let text_cols = Tensor::cat(&[g("text_m"), g("text_queue").t().unwrap()], 0).unwrap();
        let t = g("t").to_scalar::<f64>().unwrap();
        let alpha = g("alpha").to_scalar::<f64>().unwrap();
        let ti = soft_targets(&g("image_m"), &text_cols, t.exp(), alpha, &hard).unwrap();
        let tt = soft_targets(&g("text_m"), &image_cols, t.exp(), alpha, &hard).unwrap();
        assert!(
            max_abs_diff(&ti, &g("targets_i2t")) < 1e-7,
            "{case} i2t targets"
        );
        assert!(
            max_abs_diff(&tt, &g("targets_t2i")) < 1e-7,
            "{case} t2i targets"
        );
        let img = Var::from_tensor(&g("image")).unwrap();
        let txt = Var::from_tensor(&g("text")).unwrap();
        let tv = Var::from_tensor(&g("t")).unwrap();
        let loss =
            distilled_itc_loss(&img, &txt, &image_cols, &text_cols, &tv, &ti, &tt, 4).unwrap();
        let l = loss.to_scalar::<f64>().unwrap();
        let want = g("loss").to_scalar::<f64>().unwrap();
        assert!((l - want).abs() < 1e-12, "{case}: loss {l} vs {want}");
        let grads = loss.backward().unwrap();
        for (v, k) in [(&img, "grad_image"), (&txt, "grad_text"), (&tv, "grad_t")] {
            let d = max_abs_diff(grads.get(v).unwrap(), &g(k));
            assert!(d < 1e-7, "{case}: {k} off by {d}");
        }
    }
}

/// `_dequeue_and_enqueue` and `_momentum_update`, as ALBEF writes them.
#[test]
fn queue_and_momentum_updates_match_albef() {
    let r = reference("distill.reference.safetensors");
    let g = |k: &str| r[&format!("blip/{k}")].to_dtype(DType::F32).unwrap();
    let mut q = FeatureQueues {
        image: g("image_queue").t().unwrap().contiguous().unwrap(),
        text: g("text_queue").t().unwrap().contiguous().unwrap(),
        ids: ids(&g("idx_queue"))
            .iter()
            .map(|&i| (i >= 0).then_some(i as u64))
            .collect(),
        cursor: g("ptr")
            .to_dtype(DType::I64)
            .unwrap()
            .to_scalar::<i64>()
            .unwrap() as usize,
    };
    let batch_ids: Vec<u64> = ids(&g("idx")).iter().map(|&i| i as u64).collect();
    q.push(&g("image_m"), &g("text_m"), &batch_ids).unwrap();
    assert_eq!(
        max_abs_diff(&q.image, &g("queue_image_after").t().unwrap()),
        0.0
    );
    assert_eq!(
        max_abs_diff(&q.text, &g("queue_text_after").t().unwrap()),
        0.0
    );
    let after: Vec<Option<u64>> = ids(&g("idx_queue_after"))
        .iter()
        .map(|&i| (i >= 0).then_some(i as u64))
        .collect();
    assert_eq!(q.ids, after);
    assert_eq!(q.cursor as i64, ids(&g("ptr_after").reshape(1).unwrap())[0]);

    let spec = DistillSpec {
        momentum: 0.995,
        alpha: 0.4,
        alpha_warmup_steps: 0,
        queue_size: 0,
        same_image_targets: true,
    };
    let p = Var::from_tensor(&r["ema/momentum"]).unwrap();
    let d = Distillation::new(&spec, &[("w".into(), p.clone())], &[4], 4, 0, &Device::Cpu).unwrap();
    p.set(&r["ema/param"]).unwrap();
    d.update().unwrap();
    let m = &d.state().unwrap()["momentum.w"];
    assert!(max_abs_diff(m, &r["ema/after"]) < 1e-12);
}

const DISTILL: &str = r#"
[distill]
momentum = 0.9
alpha = 0.4
alpha_warmup_steps = 2
queue_size = 16
"#;

/// The tiny CLIP of tests/training.rs with `[distill]`.
fn tiny_distilled() -> TrainConfig {
    TrainConfig::from_toml(&format!("{}{DISTILL}", tiny_noisy())).unwrap()
}

/// The tiny CLIP of tests/training.rs on 30% noisy captions.
fn tiny_noisy() -> String {
    noisy(common::TINY_CLIP_TOML)
}

/// `toml` with 30% caption noise in its shapes data.
fn noisy(toml: &str) -> String {
    assert!(toml.contains("[data]\n"), "a config with a [data] section");
    toml.replace("[data]\n", "[data]\nshapes_caption_noise = 0.3\n")
}

/// Every trainable tensor gets a finite gradient, and two micro-batches give the large batch's
/// gradient (after a step, so that queue and momentum copy are no longer trivial).
#[test]
fn distilled_training_accumulates_exactly() {
    let cfg = tiny_distilled();
    let mut run = Run::new(cfg, &Device::Cpu).unwrap();
    let mut loader = run.loader().unwrap();
    let first = loader.next_batch().unwrap();
    // The momentum CLIP starts as the model itself: the same features.
    let clip = run.task.as_clip().unwrap();
    let d = clip.distill.as_ref().unwrap();
    let pixels = first.pixel_tensor(&Device::Cpu).unwrap();
    let (ids, mask) = (&first.tokens.ids, &first.tokens.mask);
    assert_eq!(
        max_abs_diff(
            &clip.model.image_features(&pixels).unwrap(),
            &d.model.image_features(&pixels).unwrap()
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &clip.model.text_features(ids, mask).unwrap(),
            &d.model.text_features(ids, mask).unwrap()
        ),
        0.0
    );
    let task = &mut run.task;
    task.grads(std::slice::from_ref(&first), 0).unwrap();
    task.after_step().unwrap();
    let big = loader.next_batch().unwrap();
    let before = task.state().unwrap();
    let (g_big, l_big) = task.grads(std::slice::from_ref(&big), 3).unwrap();
    // Undo the big step's enqueue, then take the same step in two halves.
    task.load_state(&before, "test").unwrap();
    let (g_acc, l_acc) = task.grads(&[big.rows(0..4), big.rows(4..8)], 3).unwrap();
    assert!(l_big.total.is_finite());
    assert!(
        (l_big.total - l_acc.total).abs() < 1e-5,
        "{} vs {}",
        l_big.total,
        l_acc.total
    );
    let n_vars = task.vars().len();
    assert_eq!(g_big.len(), n_vars, "every variable has a gradient");
    let rel = common::grads_rel_diff(&g_big, &g_acc);
    assert!(rel < 1e-4, "accumulated gradient off by {rel}");
    for (name, g) in &g_big {
        let n = common::grad_norm(g);
        assert!(n.is_finite(), "{name}");
    }
    // The queue took the batch: its newest ids are the batch's.
    let st = task.state().unwrap();
    let filled: Vec<u8> = st["queue.filled"].to_vec1().unwrap();
    assert_eq!(filled.iter().filter(|&&f| f == 1).count(), 16);
}

fn file(dir: &Path, rel: &str) -> Vec<u8> {
    std::fs::read(dir.join(rel)).unwrap()
}

/// A distilled run stopped at step 3 and resumed ends bit-identical to one run straight
/// through: weights, optimiser, momentum copy and queues.
#[test]
fn resumed_distilled_training_is_bit_exact() {
    let cfg = tiny_distilled();
    let straight = scratch("distill-straight");
    train(&cfg, &straight, false);
    let split = scratch("distill-split");
    let mut first = cfg.clone();
    first.train.steps = 3;
    train(&first, &split, false);
    let r = train(&cfg, &split, true);
    assert_eq!((r.resumed_from, r.steps), (Some(3), 6));
    common::assert_same_weights(&straight, &split);
    for f in ["optimizer.safetensors", "task_state.safetensors"] {
        let rel = format!("checkpoints/step-0000006/{f}");
        assert!(file(&straight, &rel) == file(&split, &rel), "{f} differs");
    }
    // A checkpoint without its momentum state cannot resume a distilled run.
    std::fs::remove_file(split.join("checkpoints/step-0000006/task_state.safetensors")).unwrap();
    let mut more = cfg.clone();
    more.train.steps = 7;
    let opts = vlalign::train::trainer::RunOptions {
        run_dir: split.clone(),
        resume: true,
        progress: false,
        comm: vlalign::dist::single(),
    };
    let e = Run::new(more, &Device::Cpu)
        .unwrap()
        .train(&opts, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("momentum"), "{e}");
}

/// Configs that cannot distil are refused with the key named.
#[test]
fn distill_config_errors_name_the_key() {
    for (extra, needle) in [
        ("[distill]\nqueue_size = 12\n", "queue_size"),
        ("[distill]\nqueue_size = 16\nmomentum = 1.0\n", "momentum"),
        ("[distill]\nqueue_size = 16\nalpha = 2\n", "alpha"),
        ("[distill]\nqueue_size = 16\nwhat = 1\n", "what"),
    ] {
        let e = TrainConfig::from_toml(&format!("{}{extra}", tiny_noisy())).unwrap_err();
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let siglip = tiny_noisy().replace("seed = 7", "seed = 7\nloss = \"siglip\"");
    let e = TrainConfig::from_toml(&format!("{siglip}[distill]\nqueue_size = 16\n")).unwrap_err();
    assert!(e.contains("infonce"), "{e}");
}

/// BLIP-2's ITC similarity (max over queries / temp, LAVIS) under ALBEF's distillation with
/// BLIP's image-id targets, against PyTorch: what the Q-Former task computes in its first pass.
#[test]
fn qformer_distilled_itc_matches_pytorch() {
    use vlalign::objectives::distill::{distilled_loss, mix_targets};
    use vlalign::objectives::itc::max_over_queries;
    let r = reference("distill.reference.safetensors");
    let g = |k: &str| r[&format!("qformer/{k}")].clone();
    let batch_ids: Vec<u64> = ids(&g("idx")).iter().map(|&i| i as u64).collect();
    let queue_ids: Vec<Option<u64>> = ids(&g("idx_queue"))
        .iter()
        .map(|&i| (i >= 0).then_some(i as u64))
        .collect();
    let hard = hard_targets(&batch_ids, &queue_ids, true, &Device::Cpu).unwrap();
    let image_cols = FeatureQueues::columns(&g("image_m"), &g("image_queue")).unwrap();
    let text_cols = FeatureQueues::columns(&g("text_m"), &g("text_queue")).unwrap();
    let alpha = g("alpha").to_scalar::<f64>().unwrap();
    let temp = Var::from_tensor(&g("temp")).unwrap();
    let t_m = temp.as_tensor().detach();
    let sim_i2t_m = max_over_queries(&g("image_m"), &text_cols)
        .unwrap()
        .broadcast_div(&t_m)
        .unwrap();
    let sim_t2i_m = max_over_queries(&image_cols, &g("text_m"))
        .unwrap()
        .t()
        .unwrap()
        .broadcast_div(&t_m)
        .unwrap();
    let ti = mix_targets(&sim_i2t_m, alpha, &hard).unwrap();
    let tt = mix_targets(&sim_t2i_m, alpha, &hard).unwrap();
    assert!(max_abs_diff(&ti, &g("targets_i2t")) < 1e-7);
    assert!(max_abs_diff(&tt, &g("targets_t2i")) < 1e-7);
    let img = Var::from_tensor(&g("image")).unwrap();
    let txt = Var::from_tensor(&g("text")).unwrap();
    let sim_i2t = max_over_queries(&img, &text_cols)
        .unwrap()
        .broadcast_div(&temp)
        .unwrap();
    let sim_t2i = max_over_queries(&image_cols, &txt)
        .unwrap()
        .t()
        .unwrap()
        .broadcast_div(&temp)
        .unwrap();
    let loss = distilled_loss(&sim_i2t, &sim_t2i, &ti, &tt, 4).unwrap();
    let l = loss.to_scalar::<f64>().unwrap();
    let want = g("loss").to_scalar::<f64>().unwrap();
    assert!((l - want).abs() < 1e-12, "loss {l} vs {want}");
    let grads = loss.backward().unwrap();
    for (v, k) in [
        (&img, "grad_image"),
        (&txt, "grad_text"),
        (&temp, "grad_temp"),
    ] {
        let d = max_abs_diff(grads.get(v).unwrap(), &g(k));
        assert!(d < 1e-7, "{k} off by {d}");
    }
}

/// The tiny Q-Former of tests/qformer_training.rs with `[distill]`.
fn tiny_qformer_distilled() -> TrainConfig {
    let text = format!(
        "{}[distill]\nmomentum = 0.9\nalpha = 0.4\nqueue_size = 12\n",
        noisy(&common::tiny_qformer_toml())
    );
    TrainConfig::from_toml(&text).unwrap()
}

/// The Q-Former with distilled ITC: every trainable tensor learns, two micro-batches give the
/// large batch's gradient once queue and momentum copy hold real features, and a resumed run
/// is bit-identical (momentum state included).
#[test]
fn qformer_distillation_accumulates_and_resumes_exactly() {
    let cfg = tiny_qformer_distilled();
    let mut run = Run::new(cfg.clone(), &Device::Cpu).unwrap();
    let mut loader = run.loader().unwrap();
    let first = loader.next_batch().unwrap();
    let task = &mut run.task;
    task.grads(std::slice::from_ref(&first), 0).unwrap();
    task.after_step().unwrap();
    let big = loader.next_batch().unwrap();
    let before = task.state().unwrap();
    let (g_big, l_big) = task.grads(std::slice::from_ref(&big), 1).unwrap();
    task.load_state(&before, "test").unwrap();
    let (g_acc, l_acc) = task.grads(&[big.rows(0..3), big.rows(3..6)], 1).unwrap();
    assert!(l_big.total.is_finite());
    assert!(
        (l_big.total - l_acc.total).abs() < 1e-4,
        "{} vs {}",
        l_big.total,
        l_acc.total
    );
    let rel = common::grads_rel_diff(&g_big, &g_acc);
    assert!(rel < 1e-3, "accumulated gradient off by {rel}");
    assert_eq!(g_big.len(), task.vars().len());
    for (name, g) in &g_big {
        assert!(common::grad_norm(g).is_finite(), "{name}");
    }

    let straight = scratch("qformer-distill-straight");
    train(&cfg, &straight, false);
    let split = scratch("qformer-distill-split");
    let mut first = cfg.clone();
    first.train.steps = 2;
    train(&first, &split, false);
    train(&cfg, &split, true);
    common::assert_same_weights(&straight, &split);
    let rel = "checkpoints/step-0000004/task_state.safetensors";
    assert!(file(&straight, rel) == file(&split, rel));
}
