//! The Q-Former verbs as a user runs them. `itm` on a `Blip2ForImageTextRetrieval` directory
//! built by transformers 5.23 (the qformer-a fixture, with a WordPiece tokenizer.json) must give
//! transformers' ITM match probabilities and ITC scores (tools/reference/make_qformer_fixtures.py
//! `cli_reference`) within 1e-4; `retrieve` ranks by the same ITC scores; `train` + `caption` +
//! `eval` work on a directory vlalign trains; bad input is a one-line error with exit code 1.

mod common;

use common::{assert_only_error, fixture, json, scratch, vlalign};

#[test]
fn itm_and_retrieve_match_transformers() {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qformer-a.cli.json")).unwrap())
            .unwrap();
    let texts: Vec<String> = serde_json::from_value(r["texts"].clone()).unwrap();
    let model = fixture("qformer-a");
    let image = fixture("qformer-a-images/img0.png");
    let mut args = vec![
        "itm",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--json",
        "--text",
    ];
    args.extend(texts.iter().map(String::as_str));
    let out = json(&vlalign(&args));
    assert_eq!(out["image"], image.to_str().unwrap());
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), texts.len());
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["text"], texts[i].as_str());
        for key in ["itm", "itc"] {
            let (got, want) = (res[key].as_f64().unwrap(), r[key][i].as_f64().unwrap());
            assert!(
                (got - want).abs() <= 1e-4,
                "{key} of {:?}: {got} vs {want}",
                texts[i]
            );
        }
    }

    let imgs = fixture("qformer-a-images");
    let retrieve = |extra: &[&str]| {
        let mut a = vec![
            "retrieve",
            "--model",
            model.to_str().unwrap(),
            "--query",
            &texts[0],
        ];
        a.extend(["--images", imgs.to_str().unwrap(), "--json"]);
        a.extend(extra);
        json(&vlalign(&a))
    };
    let out = retrieve(&[]);
    let list = out["results"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0]["score"].as_f64() >= list[1]["score"].as_f64());
    let img0 = list
        .iter()
        .find(|x| x["image"].as_str().unwrap().ends_with("img0.png"))
        .unwrap();
    let want = r["itc"][0].as_f64().unwrap();
    assert!((img0["itc"].as_f64().unwrap() - want).abs() <= 1e-4);
    let reranked = retrieve(&["--rerank", "itm"]);
    assert!(reranked["results"][0]["itm"].is_number());

    // HF's retrieval class has no ITG head: captioning says so.
    assert_only_error(
        &vlalign(&[
            "caption",
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ]),
        "bos_token_id",
    );
    assert_only_error(
        &vlalign(&[
            "itm",
            "--model",
            "/nonexistent/q",
            "--image",
            image.to_str().unwrap(),
            "--text",
            "x",
        ]),
        "/nonexistent/q",
    );
    assert_only_error(
        &vlalign(&[
            "retrieve",
            "--model",
            model.to_str().unwrap(),
            "--query",
            "x",
            "--images",
            "/nonexistent/imgs",
        ]),
        "/nonexistent/imgs",
    );
}

#[test]
fn train_caption_and_eval_a_tiny_qformer() {
    let dir = scratch("qformer-cli");
    let model = common::train_tiny_qformer(&dir).display().to_string();
    let data = dir.join("shapes");
    assert!(vlalign(&[
        "data",
        "shapes",
        "--out",
        data.to_str().unwrap(),
        "--n",
        "6",
        "--seed",
        "2",
        "--objects",
        "1"
    ])
    .status
    .success());
    let img = data.join("images/000001.png");
    let caps = json(&vlalign(&[
        "caption",
        "--model",
        &model,
        "--image",
        img.to_str().unwrap(),
        "--beams",
        "2",
        "--max-len",
        "5",
        "--json",
    ]));
    assert_eq!(caps["captions"].as_array().unwrap().len(), 1);
    assert!(caps["captions"][0]["text"].is_string());
    let ev = json(&vlalign(&[
        "eval",
        "--model",
        &model,
        "--data",
        data.join("manifest.jsonl").to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(ev["n_images"], 6);
    for k in ["itc", "itm_reranked"] {
        assert!(ev[k]["t2i_r1"].as_f64().is_some(), "{ev}");
    }
    assert!(ev.get("caption_seen_greedy").is_some() || ev.get("caption_unseen_greedy").is_some());
    assert_only_error(
        &vlalign(&["caption", "--model", &model, "--image", "/nonexistent.png"]),
        "/nonexistent.png",
    );
}

/// `vlalign capfilt` on a noisy shapes manifest: the report's counts agree with the manifest it
/// writes, the filter is scored against the `noisy` flags (at threshold 0 every original pair is
/// kept: recall 1, precision = the clean fraction counted from the input), the same seed writes
/// the same manifest, and bad input is a one-line error.
#[test]
fn capfilt_filters_a_noisy_manifest() {
    let dir = scratch("capfilt-cli");
    let model = common::train_tiny_qformer(&dir).display().to_string();
    let data = dir.join("noisy");
    let o = vlalign(&[
        "data",
        "shapes",
        "--out",
        data.to_str().unwrap(),
        "--n",
        "24",
        "--seed",
        "3",
        "--pairs",
        "seen",
        "--caption-noise",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let manifest = data.join("manifest.jsonl");
    let entries = vlalign::data::manifest::read(&manifest).unwrap();
    let noisy = entries.iter().filter(|e| e.noisy == Some(true)).count();
    assert!(noisy > 0 && noisy < 24, "{noisy}");
    let run = |out: &str, threshold: &str, extra: &[&str]| {
        let out = dir.join(out);
        let mut args = vec![
            "capfilt",
            "--captioner",
            &model,
            "--filter",
            &model,
            "--data",
            manifest.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--threshold",
            threshold,
            "--json",
        ];
        args.extend_from_slice(extra);
        let r = json(&vlalign(&args));
        let kept = vlalign::data::manifest::read(&out.join("manifest.jsonl")).unwrap();
        (r, kept, std::fs::read(out.join("manifest.jsonl")).unwrap())
    };
    let (r, kept, bytes) = run("all", "0", &[]);
    assert_eq!(
        (r["images"].as_u64(), r["pairs"].as_u64()),
        (Some(24), Some(24))
    );
    assert_eq!(
        (r["kept_original"].as_u64(), r["kept_synthetic"].as_u64()),
        (Some(24), Some(24))
    );
    assert_eq!(kept.len(), 48);
    assert!(kept
        .iter()
        .all(|e| e.image.is_absolute() && e.image.is_file()));
    let s = &r["score"];
    assert_eq!(s["recall"].as_f64(), Some(1.0));
    let clean = (24 - noisy) as f64 / 24.0;
    assert!(
        (s["precision"].as_f64().unwrap() - clean).abs() < 1e-12,
        "{s}"
    );
    assert_eq!(s["noisy_pairs"].as_u64(), Some(noisy as u64));
    // Same seed, same synthetic captions.
    let (_, _, again) = run("again", "0", &[]);
    assert!(bytes == again);
    // Originals only: the written manifest holds exactly what the report counts.
    let (r, kept, _) = run("originals", "0", &["--no-synthetic"]);
    assert_eq!(r["kept_synthetic"].as_u64(), Some(0));
    assert_eq!(kept.len(), 24);
    assert_eq!(kept.iter().filter(|e| e.noisy == Some(true)).count(), noisy);

    let out = dir.join("err");
    let m = manifest.to_str().unwrap();
    let clip = fixture("clip-a");
    for (args, needle) in [
        (
            vec![
                "--captioner",
                &model,
                "--filter",
                &model,
                "--data",
                "/nonexistent.jsonl",
            ],
            "/nonexistent.jsonl",
        ),
        (
            vec![
                "--captioner",
                clip.to_str().unwrap(),
                "--filter",
                &model,
                "--data",
                m,
            ],
            "--captioner",
        ),
        (
            vec![
                "--captioner",
                &model,
                "--filter",
                &model,
                "--data",
                m,
                "--threshold",
                "2",
            ],
            "--threshold",
        ),
        (
            vec![
                "--captioner",
                &model,
                "--filter",
                &model,
                "--data",
                m,
                "--top-p",
                "0",
            ],
            "--top-p",
        ),
    ] {
        let mut a = vec!["capfilt", "--out", out.to_str().unwrap()];
        a.extend(args);
        assert_only_error(&vlalign(&a), needle);
    }
    // A filter that keeps nothing writes nothing (a manifest with no pairs cannot train).
    let none = dir.join("none");
    common::assert_user_error(
        &vlalign(&[
            "capfilt",
            "--captioner",
            &model,
            "--filter",
            &model,
            "--data",
            m,
            "--out",
            none.to_str().unwrap(),
            "--threshold",
            "1",
        ]),
        "kept no pair",
    );
    assert!(!none.exists());
    let full = dir.join("all");
    assert_only_error(
        &vlalign(&[
            "capfilt",
            "--captioner",
            &model,
            "--filter",
            &model,
            "--data",
            m,
            "--out",
            full.to_str().unwrap(),
        ]),
        "not empty",
    );
}
