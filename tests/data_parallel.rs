//! Data-parallel training on ranks that are threads of this process (`dist::threads`): N ranks
//! train exactly as one process with the global batch — same data, same loss, same steps —
//! up to the order in which float32 additions happen.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{run_weights, scratch};
use vlalign::dist::threads::ThreadComm;
use vlalign::train::build::Run;
use vlalign::train::config::{ContrastiveLoss, TrainConfig};
use vlalign::train::trainer::{RunOptions, RunReport};

fn tiny() -> TrainConfig {
    TrainConfig::from_toml(common::TINY_CLIP_TOML).unwrap()
}

/// Trains `cfg` into `dir` on `n` thread ranks; every rank's report, in rank order.
fn train_ranks(cfg: &TrainConfig, dir: &Path, n: usize, resume: bool) -> Vec<RunReport> {
    let handles: Vec<_> = ThreadComm::group(n)
        .into_iter()
        .map(|c| {
            let (cfg, dir) = (cfg.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                let opts = RunOptions {
                    run_dir: dir,
                    resume,
                    progress: false,
                    comm: Arc::new(c),
                };
                Run::new(cfg, &Device::Cpu)?.train(&opts, None)
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
fn weight_gap(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f32, String, f64) {
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
fn assert_same_run(what: &str, one: &Path, ranks: &Path) {
    let (worst, name, frac) = weight_gap(&run_weights(one), &run_weights(ranks));
    eprintln!(
        "{what}: weights max |diff| {worst:e} ({name}), {:.3}% over 1e-6",
        frac * 100.0
    );
    assert!(worst < 5e-5, "{what}: {name} off by {worst}");
    assert!(frac < 1e-3, "{what}: {:.3}% off by > 1e-6", frac * 100.0);
}

/// CLIP with InfoNCE and SigLIP, on 2 and 4 ranks, with and without accumulation: six steps
/// end where one process ends ([`assert_same_run`]), with the same loss.
#[test]
fn ranks_train_as_one_process_with_the_global_batch() {
    for (loss, accum) in [
        (ContrastiveLoss::InfoNce, 1),
        (ContrastiveLoss::SigLip, 1),
        (ContrastiveLoss::InfoNce, 2),
    ] {
        let mut cfg = tiny();
        cfg.train.loss = loss;
        cfg.train.accum_steps = accum;
        let one = scratch(&format!("dp-one-{loss:?}-{accum}"));
        let r1 = common::train(&cfg, &one, false);
        for n in [2usize, 4] {
            let dir = scratch(&format!("dp-{n}-{loss:?}-{accum}"));
            let reports = train_ranks(&cfg, &dir, n, false);
            for r in &reports {
                assert_eq!(r.steps, 6);
                assert_eq!(r.last_loss.to_bits(), reports[0].last_loss.to_bits());
            }
            let dl = (reports[0].last_loss - r1.last_loss).abs();
            assert!(dl < 1e-5, "{loss:?} {n} ranks: loss {dl}");
            assert_same_run(&format!("{loss:?}, accum {accum}, {n} ranks"), &one, &dir);
        }
    }
}

/// The Q-Former step (ITC over the global batch, hard negatives drawn from the global
/// similarities, ITM and ITG on each rank's pairs) on 2 ranks and on 4 (6 pairs: parts of 1
/// and 2), with and without accumulation, ends where one process ends.
#[test]
fn qformer_ranks_train_as_one_process() {
    let base = TrainConfig::from_toml(&common::tiny_qformer_toml()).unwrap();
    for (accum, ranks) in [(1usize, vec![2usize, 4]), (2, vec![2])] {
        let mut cfg = base.clone();
        cfg.train.accum_steps = accum;
        let one = scratch(&format!("dpq-one-{accum}"));
        let r1 = common::train(&cfg, &one, false);
        for n in ranks {
            let dir = scratch(&format!("dpq-{n}-{accum}"));
            let reports = train_ranks(&cfg, &dir, n, false);
            let dl = (reports[0].last_loss - r1.last_loss).abs();
            assert!(dl < 1e-5, "accum {accum}, {n} ranks: loss {dl}");
            assert_same_run(&format!("Q-Former, accum {accum}, {n} ranks"), &one, &dir);
        }
    }
}

/// A run checkpointed by one process resumes on two ranks (the data position counts global
/// samples; the optimiser state is the same on every rank) and ends where one process ends.
#[test]
fn a_run_resumes_with_another_rank_count() {
    let cfg = tiny();
    let one = scratch("dp-resume-one");
    common::train(&cfg, &one, false);
    let mut first = cfg.clone();
    first.train.steps = 3;
    let dir = scratch("dp-resume-two");
    common::train(&first, &dir, false);
    let reports = train_ranks(&cfg, &dir, 2, true);
    assert_eq!(reports[1].resumed_from, Some(3));
    assert_same_run("resumed on 2 ranks", &one, &dir);
}

#[test]
fn what_cannot_run_on_ranks_says_why() {
    let mut cfg = tiny();
    cfg.train.batch_size = 2;
    let err = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(4)
            .into_iter()
            .map(|c| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let opts = RunOptions {
                        run_dir: scratch(&format!("dp-small-{}", vlalign::dist::Comm::rank(&c))),
                        resume: false,
                        progress: false,
                        comm: Arc::new(c),
                    };
                    Run::new(cfg, &Device::Cpu).unwrap().train(&opts, None)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().unwrap_err().to_string())
            .collect::<Vec<_>>()
    });
    assert!(
        err[0].contains("train.batch_size must be at least the number of ranks"),
        "{err:?}"
    );
    let mut d = tiny();
    d.distill = Some(
        TrainConfig::from_toml(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/configs/clip-tiny-noisy-distill.toml"
            ))
            .unwrap(),
        )
        .unwrap()
        .distill
        .unwrap(),
    );
    let mut comms = ThreadComm::group(2);
    let opts = RunOptions {
        run_dir: scratch("dp-distill"),
        resume: false,
        progress: false,
        comm: Arc::new(comms.remove(0)),
    };
    let e = Run::new(d, &Device::Cpu)
        .unwrap()
        .train(&opts, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not train data-parallel yet"), "{e}");
}
