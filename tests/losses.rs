//! Losses and AdamW against open_clip 3.3 / torch 2.15 (tools/reference/make_loss_fixtures.py),
//! in float64.

mod common;

use candle_core::Var;
use common::{max_abs_diff, reference};
use vlalign::objectives::contrastive::{clip_loss, siglip_loss};
use vlalign::train::optim::{AdamW, AdamWConfig};

fn check(name: &str) {
    let r = reference("losses.reference.safetensors");
    let k = |s: &str| r[&format!("{name}/{s}")].clone();
    let img = Var::from_tensor(&k("image")).unwrap();
    let txt = Var::from_tensor(&k("text")).unwrap();
    let t = Var::from_tensor(&k("t")).unwrap();
    let (loss, b) = if name == "siglip" {
        let b = Var::from_tensor(&k("b")).unwrap();
        (siglip_loss(&img, &txt, &t, &b).unwrap(), Some(b))
    } else {
        (clip_loss(&img, &txt, &t).unwrap(), None)
    };
    let d = max_abs_diff(&loss, &k("loss"));
    assert!(d < 1e-12, "{name} loss off by {d}");
    let g = loss.backward().unwrap();
    let mut pairs = vec![(&img, "grad_image"), (&txt, "grad_text"), (&t, "grad_t")];
    if let Some(b) = &b {
        pairs.push((b, "grad_b"));
    }
    for (v, key) in pairs {
        let d = max_abs_diff(g.get(v).unwrap(), &k(key));
        assert!(d < 1e-12, "{name} {key} off by {d}");
    }
}

#[test]
fn clip_loss_matches_open_clip() {
    check("clip");
}

#[test]
fn siglip_loss_matches_open_clip() {
    check("siglip");
}

#[test]
fn adamw_matches_torch() {
    let r = reference("losses.reference.safetensors");
    let w = Var::from_tensor(&r["adamw/w0"]).unwrap();
    let b = Var::from_tensor(&r["adamw/b0"]).unwrap();
    // Named so that `w` (a matrix) is decayed and `b` (a bias) is not, as the fixture's groups.
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(
        vec![
            ("layer.weight".into(), w.clone()),
            ("layer.bias".into(), b.clone()),
        ],
        cfg,
    )
    .unwrap();
    for k in 0..3 {
        let grads: vlalign::train::optim::Grads = [
            (
                "layer.weight".to_string(),
                r[&format!("adamw/gw{k}")].clone(),
            ),
            ("layer.bias".to_string(), r[&format!("adamw/gb{k}")].clone()),
        ]
        .into();
        opt.step(&grads, 1e-2).unwrap();
        let dw = max_abs_diff(w.as_tensor(), &r[&format!("adamw/w{}", k + 1)]);
        let db = max_abs_diff(b.as_tensor(), &r[&format!("adamw/b{}", k + 1)]);
        assert!(dw < 1e-6 && db < 1e-6, "step {k}: {dw} {db}");
    }
}
