//! ARCHITECTURE.md's rules, checked on the source: `src/` holds only lib.rs, main.rs, error.rs
//! and folders; each folder imports (`crate::…`) only the layers the code map allows; the CLI
//! never reads a model directory's config itself.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Folder → the library folders it may import (besides itself and `error`).
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "apps",
        &[
            "train",
            "eval",
            "infer",
            "models",
            "objectives",
            "data",
            "nn",
            "io",
            "rng",
            "dist",
        ],
    ),
    (
        "train",
        &[
            "infer",
            "models",
            "objectives",
            "data",
            "nn",
            "io",
            "rng",
            "dist",
        ],
    ),
    ("serve", &["infer", "data", "nn"]),
    ("eval", &["infer", "data"]),
    ("infer", &["models", "objectives", "data", "nn", "io"]),
    ("models", &["nn", "io"]),
    ("objectives", &["nn"]),
    ("data", &["io", "rng", "dist"]),
    ("nn", &["rng"]),
    ("io", &[]),
    ("rng", &[]),
    ("dist", &[]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules named by `crate::NAME` paths in `text`, outside `//` comments.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn src_holds_only_the_crate_roots_and_folders() {
    let mut loose: Vec<String> = std::fs::read_dir(src())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    loose.sort();
    assert_eq!(loose, ["error.rs", "lib.rs", "main.rs"]);
}

#[test]
fn no_import_runs_up_the_layers() {
    let mut checked = 0;
    for (folder, allowed) in ALLOWED {
        let mut files = Vec::new();
        rust_files(&src().join(folder), &mut files);
        assert!(!files.is_empty(), "src/{folder} is empty");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for m in crate_imports(&text) {
                assert!(
                    m == *folder || m == "error" || allowed.contains(&m.as_str()),
                    "{} imports crate::{m}, which ARCHITECTURE.md does not allow for src/{folder}",
                    f.display()
                );
            }
            checked += 1;
        }
    }
    // Every library folder is listed.
    let listed: BTreeSet<&str> = ALLOWED.iter().map(|(f, _)| *f).collect();
    for e in std::fs::read_dir(src()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() && name != "cli" {
            assert!(
                listed.contains(name.as_str()),
                "src/{name} has no row in ALLOWED"
            );
        }
    }
    assert!(checked > 50, "{checked} files");
}

#[test]
fn the_cli_never_reads_a_model_config() {
    let mut files = Vec::new();
    rust_files(&src().join("cli"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for banned in [
                "join(\"config.json\")",
                "model_type",
                "\"blip-2\"",
                "read_json",
            ] {
                assert!(
                    !code.contains(banned),
                    "{}:{}: `{banned}` (the kind of a model directory is decided by \
                     models::ModelDir alone)",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}

#[test]
fn the_import_scanner_sees_paths() {
    let t = "use crate::io::Weights;\n// crate::train in a comment\nlet x = crate::nn::ops::f();";
    let got: Vec<String> = crate_imports(t).into_iter().collect();
    assert_eq!(got, ["io", "nn"]);
}

/// The training path (src/train, src/objectives, src/models, src/nn) reads tensor values to the
/// host only through `nn::host`, which counts the reads (`host_reads_per_step` in a run's
/// metrics): on a GPU each read waits for the device. Test modules and the CPU-only kernels
/// (`nn/fused_attention.rs` reads its mask, already host memory) are exempt.
#[test]
fn the_training_path_reads_the_device_through_nn_host() {
    let exempt = ["nn/host.rs", "nn/fused_attention.rs"];
    let mut checked = 0;
    for folder in ["train", "objectives", "models", "nn"] {
        let mut files = Vec::new();
        rust_files(&src().join(folder), &mut files);
        for f in files {
            let rel = f
                .strip_prefix(src())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if exempt.contains(&rel.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (n, line) in lines.iter().enumerate() {
                // The test module (`#[cfg(test)]` then `mod …`) ends the checked part.
                let next = lines.get(n + 1).map_or("", |l| l.trim_start());
                if line.trim_start().starts_with("#[cfg(test)]") && next.starts_with("mod ") {
                    break;
                }
                let code = line.split("//").next().unwrap_or("");
                for banned in [".to_scalar", ".to_vec0", ".to_vec1", ".to_vec2", ".to_vec3"] {
                    assert!(
                        !code.contains(banned),
                        "{rel}:{}: `{banned}` on the training path: read through nn::host \
                         (counted reads)",
                        n + 1
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "{checked} files");
}
