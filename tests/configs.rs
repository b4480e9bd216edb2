//! The shipped configs parse, and `configs/clip-vit-b32.toml` builds exactly the OpenAI
//! ViT-B/32 CLIP: 151,277,313 parameters, the count transformers 5.23 gives for its default
//! `CLIPConfig()` (which is ViT-B/32): `sum(p.numel() for p in CLIPModel(CLIPConfig()).parameters())`.

use candle_core::Device;
use vlalign::train::build::AnyTask;
use vlalign::train::config::TrainConfig;

fn load(name: &str) -> TrainConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name);
    TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn clip_tiny_is_the_demo_config() {
    let c = load("clip-tiny.toml");
    assert_eq!(
        c,
        TrainConfig::from_toml(vlalign::apps::demo::clip::CLIP_TINY_TOML).unwrap()
    );
    assert_eq!(c.data.source, "shapes");
}

#[test]
fn clip_vit_b32_has_the_openai_parameter_count() {
    let c = load("clip-vit-b32.toml");
    let task = AnyTask::new(&c, &Device::Cpu).unwrap();
    let task = task.as_clip().unwrap();
    let n: usize = task
        .parts
        .varmap
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().elem_count())
        .sum();
    assert_eq!(n, 151_277_313);
    assert_eq!(task.config.text_config.vocab_size, 49408);
    assert_eq!(task.config.vision_config.image_size, 224);
}

/// `configs/clip-tiny-rn.toml` is clip-tiny with a ModifiedResNet image tower whose parameter
/// count is open_clip's for the same shape: `sum(p.numel() for p in
/// ModifiedResNet(layers=[1, 1, 1, 1], output_dim=128, heads=8, image_size=64,
/// width=16).parameters())` = 1,362,200 (plus 4,864 BatchNorm running statistics).
#[test]
fn clip_tiny_rn_is_clip_tiny_with_open_clips_resnet() {
    let rn = load("clip-tiny-rn.toml");
    let vit = load("clip-tiny.toml");
    assert_eq!((&rn.data, &rn.train), (&vit.data, &vit.train));
    let task = AnyTask::new(&rn, &Device::Cpu).unwrap();
    let task = task.as_clip().unwrap();
    let count = |stats: bool| -> usize {
        task.parts
            .vars()
            .iter()
            .filter(|(n, _)| n.starts_with("visual."))
            .filter(|(n, _)| (n.ends_with("running_mean") || n.ends_with("running_var")) == stats)
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    };
    assert_eq!(count(false), 1_362_200);
    assert_eq!(count(true), 4_864);
}

/// `configs/clip-finetune.toml` fine-tunes the model the main command (`demo`) writes, and
/// builds no CLIP of its own.
#[test]
fn clip_finetune_starts_from_the_demo_model() {
    let c = load("clip-finetune.toml");
    assert!(c.model.is_none() && c.qformer.is_none());
    assert_eq!(
        c.finetune.unwrap().model,
        std::path::PathBuf::from("runs/demo/model")
    );
}

/// The noise study's configs are clip-tiny with 30% caption noise, and the distilled one adds
/// only `[distill]`: same model, data, steps and seed.
#[test]
fn noisy_configs_are_clip_tiny_with_noise_and_distillation() {
    let clean = load("clip-tiny.toml");
    let noisy = load("clip-tiny-noisy.toml");
    let distilled = load("clip-tiny-noisy-distill.toml");
    assert_eq!(noisy.data.shapes_caption_noise, 0.3);
    let mut back = noisy.clone();
    back.data.shapes_caption_noise = 0.0;
    assert_eq!(back, clean);
    let d = distilled.distill.clone().expect("[distill]");
    assert_eq!((d.momentum, d.alpha), (0.99, 0.4));
    assert_eq!(d.queue_size % distilled.train.batch_size, 0);
    let mut plain = distilled.clone();
    plain.distill = None;
    assert_eq!(plain, noisy);
}
