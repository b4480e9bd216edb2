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
    assert!(caps["captions"][0]["caption"].is_string());
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
