//! Property tests over everything that reads a user's bytes: image decoding and preprocessing,
//! safetensors checkpoints, config.json / preprocessor_config.json, training configs (TOML),
//! manifests (JSONL, CSV), tar shards and tokenizer input. Each takes valid inputs (the
//! fixtures), mutates them with a seeded generator, and asserts the reader never panics and
//! answers with a clear error or a usable result (finite, of bounded size). `cargo test` runs
//! a few hundred cases per reader; `tools/fuzz.sh` runs many more (VLALIGN_FUZZ_CASES).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::Device;
use common::{fixture, scratch};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vlalign::data::image::{decode_rgb, ImageProcessor};
use vlalign::data::text::TextTokenizer;
use vlalign::infer::ClipPipeline;
use vlalign::train::config::TrainConfig;

/// Cases per reader: VLALIGN_FUZZ_CASES, else `default`.
fn cases(default: usize) -> usize {
    std::env::var("VLALIGN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A copy of `input` with a few random edits: flipped bytes, runs of extreme bytes, a cut, a
/// duplicated slice, or digits replaced in text.
fn mutate(input: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = rng.random(),
            2 => {
                let n = rng.random_range(1..=8).min(b.len() - i);
                let v = if rng.random() { 0xff } else { 0x00 };
                b[i..i + n].iter_mut().for_each(|x| *x = v);
            }
            3 => b.truncate(i),
            4 => {
                let n = rng.random_range(1..=64).min(b.len() - i);
                let chunk = b[i..i + n].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
            _ => {
                if b[i].is_ascii_digit() {
                    let digits: &[u8] = match rng.random_range(0..4) {
                        0 => b"99999999999",
                        1 => b"0",
                        2 => b"-1",
                        _ => b"1e308",
                    };
                    b.splice(i..i + 1, digits.iter().copied());
                }
            }
        }
    }
    b
}

/// Runs `f` on `n` mutations of `input` under `seed`, failing with the case's seed on a panic.
fn fuzz(name: &str, input: &[u8], n: usize, seed: u64, f: impl Fn(&[u8])) {
    for case in 0..n {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(case as u64);
        let bytes = mutate(input, &mut rng);
        let r = catch_unwind(AssertUnwindSafe(|| f(&bytes)));
        assert!(
            r.is_ok(),
            "{name}: case {case} (seed {seed}) panicked on {} bytes",
            bytes.len()
        );
    }
}

#[test]
fn image_decoding_never_panics_and_stays_bounded() {
    let processor = ImageProcessor::clip_default(32);
    for name in [
        "images/rocket.jpg",
        "images/tiny.png",
        "images/astronaut_rgba.png",
        "images/chelsea_palette.png",
        "images/coffee.webp",
    ] {
        let input = std::fs::read(fixture(name)).unwrap();
        fuzz(name, &input, cases(60), 1, |bytes| {
            if let Ok(img) = decode_rgb(bytes, Path::new(name)) {
                assert!(img.width * img.height <= 89_478_485);
                assert_eq!(img.data.len(), img.width * img.height * 3);
                let (px, (h, w)) = processor.preprocess(&img).unwrap();
                assert_eq!((h, w), (32, 32));
                assert!(px.iter().all(|v| v.is_finite()));
            }
        });
    }
}

#[test]
fn model_directories_never_panic() {
    let dir = scratch("fuzz-model-dir");
    let src = fixture("clip-a");
    let files = [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ];
    for (k, target) in files.iter().enumerate() {
        let input = std::fs::read(src.join(target)).unwrap();
        let n = if *target == "model.safetensors" {
            cases(20)
        } else {
            cases(40)
        };
        fuzz(target, &input, n, 10 + k as u64, |bytes| {
            for f in files {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
            std::fs::write(dir.join(target), bytes).unwrap();
            if let Ok(p) = ClipPipeline::load(&dir, &Device::Cpu) {
                // Whatever loads gives finite embeddings or says why not.
                if let Ok(e) = p.embed_texts(&["a red circle"]) {
                    let v: Vec<Vec<f32>> = e.to_vec2().unwrap();
                    assert!(v.iter().flatten().all(|x| x.is_finite()));
                }
            }
        });
    }
}

#[test]
fn training_configs_never_panic() {
    let input = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/clip-tiny.toml"))
        .unwrap();
    fuzz("clip-tiny.toml", &input, cases(400), 20, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        if let Ok(cfg) = TrainConfig::from_toml(&text) {
            // A config that parses builds its task (small ones only: this is about panics).
            if let Ok(m) = cfg.clip() {
                if m.vision_width * m.vision_layers <= 4096 && m.text_width * m.text_layers <= 4096
                {
                    let _ = vlalign::train::build::AnyTask::new(&cfg, &Device::Cpu);
                }
            }
        }
    });
}

#[test]
fn manifests_never_panic() {
    let dir = scratch("fuzz-manifest");
    let png = std::fs::read(fixture("images/tiny.png")).unwrap();
    std::fs::write(dir.join("a.png"), &png).unwrap();
    let jsonl = b"{\"image\": \"a.png\", \"caption\": \"a red circle\"}\n{\"image\": \"a.png\", \"caption\": \"x\", \"objects\": [{\"color\": \"red\", \"shape\": \"circle\", \"size\": \"small\", \"position\": \"left\"}]}\n";
    let csv = b"filepath,title\na.png,\"a blue square, left\"\na.png,x\n";
    for (name, input) in [("m.jsonl", &jsonl[..]), ("m.csv", &csv[..])] {
        fuzz(name, input, cases(300), 30, |bytes| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            if let Ok(entries) = vlalign::data::manifest::read(&p) {
                assert!(!entries.is_empty());
            }
        });
    }
}

#[test]
fn tar_shards_never_panic() {
    let dir = scratch("fuzz-tar");
    let mut shard = tar::Builder::new(Vec::new());
    let png = std::fs::read(fixture("images/tiny.png")).unwrap();
    for (name, bytes) in [
        ("k0.png", &png[..]),
        ("k0.txt", b"a red circle"),
        ("k1.png", &png[..]),
        ("k1.json", br#"{"caption": "a blue square"}"#),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        shard.append_data(&mut h, name, bytes).unwrap();
    }
    let input = shard.into_inner().unwrap();
    fuzz("shard.tar", &input, cases(300), 40, |bytes| {
        let p = dir.join("s.tar");
        std::fs::write(&p, bytes).unwrap();
        let mut n = 0usize;
        let _ = vlalign::data::webdataset::read_shard(&p, |s| {
            n += 1;
            if let Ok((img, cap, _)) = s {
                assert!(img.len() <= bytes.len() && cap.len() <= bytes.len());
            }
        });
        assert!(
            n <= bytes.len() / 512 + 2,
            "{n} samples from {} bytes",
            bytes.len()
        );
    });
}

#[test]
fn tokenizer_input_never_panics() {
    let tok = TextTokenizer::bundled_clip(77).unwrap();
    let vocab = tok.vocab_size() as u32;
    let seed_text = "A large RED circle on the left, and a small blue square at the top! naïve café — 東京 🚀 x²";
    fuzz("text", seed_text.as_bytes(), cases(300), 50, |bytes| {
        let text = String::from_utf8_lossy(bytes).repeat(1 + bytes.len() % 3);
        let enc = tok.encode(&[text.as_str(), "", "\u{0}\u{feff}"]).unwrap();
        for row in &enc.batch.ids {
            assert!(row.len() <= 77);
            assert!(row.iter().all(|&i| i < vocab));
        }
    });
}
