//! `mpirun -np 2 vlalign train` (Open MPI, `--features mpi`) ends with the model of one
//! process training the same config; a rank that fails stops the job instead of leaving the
//! other waiting. Run by `.ci/run` as `cargo test --features mpi --test mpi`.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{run_weights, scratch, stderr};

/// `mpirun -np n vlalign ARGS` (as root in CI containers, more ranks than cores allowed),
/// killed after five minutes so that a hung job fails the test instead of stalling it.
fn mpirun(n: usize, args: &[&str]) -> Output {
    Command::new("timeout")
        .args([
            "300",
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
        ])
        .arg(n.to_string())
        .arg(env!("CARGO_BIN_EXE_vlalign"))
        .args(args)
        .output()
        .expect("mpirun (apt-get install openmpi-bin)")
}

fn write_config(dir: &Path, text: &str) -> String {
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// The tolerance of tests/data_parallel.rs: 2e-6, and 1e-5 for the key biases, whose gradient
/// is rounding noise.
#[test]
fn two_processes_train_as_one() {
    let dir = scratch("mpi-two");
    let cfg = write_config(&dir, common::TINY_CLIP_TOML);
    let (one, two) = (dir.join("one"), dir.join("two"));
    let o = common::vlalign(&["train", "--config", &cfg, "--out", one.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = mpirun(
        2,
        &[
            "train",
            "--config",
            &cfg,
            "--out",
            two.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // One summary, from rank 0.
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("model_dir").count(), 1, "{out}");
    let (a, b) = (run_weights(&one), run_weights(&two));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let d = common::max_abs_diff(t, &b[k]);
        let tol = if k.ends_with("k_proj.bias") {
            1e-5
        } else {
            2e-6
        };
        assert!(d < tol, "{k} off by {d}");
    }
}

#[test]
fn a_failing_rank_ends_the_job_with_its_error() {
    let dir = scratch("mpi-fail");
    // Four ranks cannot share a global batch of three samples: every rank stops.
    let text = common::TINY_CLIP_TOML.replace("batch_size = 8", "batch_size = 3");
    let cfg = write_config(&dir, &text);
    let run = dir.join("run");
    let o = mpirun(
        4,
        &["train", "--config", &cfg, "--out", run.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("train.batch_size must be at least the number of ranks"),
        "{}",
        stderr(&o)
    );
    // Rank 0 alone refuses a run directory that already holds a run; rank 1, waiting for
    // rank 0's state, is ended with it (timeout's 124 would mean it hung).
    let cfg = write_config(&dir, common::TINY_CLIP_TOML);
    let o = common::vlalign(&["train", "--config", &cfg, "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = mpirun(
        2,
        &["train", "--config", &cfg, "--out", run.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("already holds a run"), "{}", stderr(&o));
}
