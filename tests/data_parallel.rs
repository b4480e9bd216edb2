//! Data-parallel training on ranks that are threads of this process (`dist::threads`): N ranks
//! train exactly as one process with the global batch — same data, same loss, same steps —
//! up to the order in which float32 additions happen.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::{assert_same_run, scratch, train_ranks};
use vlalign::dist::threads::ThreadComm;
use vlalign::train::build::Run;
use vlalign::train::config::{ContrastiveLoss, TrainConfig};
use vlalign::train::trainer::RunOptions;

fn tiny() -> TrainConfig {
    TrainConfig::from_toml(common::TINY_CLIP_TOML).unwrap()
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

/// A binary without MPI started by `mpirun -np 2` would train two unrelated copies: it refuses.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_under_mpirun() {
    let dir = scratch("dp-no-mpi");
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, common::TINY_CLIP_TOML).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vlalign"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--out"])
        .arg(dir.join("run"))
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    common::assert_only_error(&o, "built without MPI");
    assert!(!dir.join("run").exists());
}
