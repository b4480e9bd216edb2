"""open_clip parity fixtures: tiny random open_clip CLIP models (ViT and ModifiedResNet image towers) saved in the
layout open_clip's push_to_hf_hub writes (open_clip_config.json + open_clip_model.safetensors),
loaded back through open_clip's own `local-dir:` loader, and its outputs on real photos and texts.

Writes tests/fixtures/open-clip-{a,b}/ and tests/fixtures/open-clip-{a,b}.reference.safetensors:
  input_ids        open_clip's SimpleTokenizer ids of TEXTS (int64, padded with 0)
  pixel_values     open_clip's eval transform of IMAGES ([N, 3, S, S])
  image_features   encode_image(normalize=True) of those pixels
  text_features    encode_text(normalize=True) of those ids
  logits           exp(logit_scale) * image_features @ text_features.T (+ logit_bias)
  train_*          (ResNet) encode_image in training mode, and BatchNorm running statistics after it

  open-clip-a: quick_gelu, float32, SigLIP-style logit_bias, bicubic "shortest" preprocessing,
               image 32 / patch 8.
  open-clip-rn: a ModifiedResNet image tower (layers [1, 2, 1, 1], width 8, 16 attention-pool
               heads) with random BatchNorm running statistics, float16 storage, image 64.
  open-clip-b: exact GELU, weights stored as float16 (outputs computed in float32 from the same
               rounded weights), mlp_ratio 2.5, LayerNorm eps 1e-6 (norm_kwargs),
               final_ln_after_pool, context 24, bilinear "squash" preprocessing, image 40 / patch 10.

Run:  .venv/bin/python tools/reference/make_open_clip_fixtures.py
"""

import json
import os

import open_clip
import torch
from open_clip.model import CLIP
from PIL import Image
from safetensors.torch import save_file

from common import ROOT, fixture_path, perturb_

CONFIGS = {
    "open-clip-a": dict(
        model_cfg=dict(
            embed_dim=24,
            quick_gelu=True,
            init_logit_bias=-4.0,
            vision_cfg=dict(image_size=32, layers=2, width=64, head_width=16, patch_size=8),
            text_cfg=dict(context_length=77, vocab_size=49408, width=8, heads=2, layers=2),
        ),
        preprocess_cfg=dict(
            mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
            interpolation="bicubic", resize_mode="shortest",
        ),
        dtype=torch.float32,
    ),
    "open-clip-b": dict(
        model_cfg=dict(
            embed_dim=16,
            vision_cfg=dict(
                image_size=40, layers=3, width=48, head_width=24, mlp_ratio=2.5, patch_size=10,
                final_ln_after_pool=True, norm_kwargs={"eps": 1e-6},
            ),
            text_cfg=dict(
                context_length=24, vocab_size=49408, width=16, heads=4, layers=1, mlp_ratio=3.0,
                norm_kwargs={"eps": 1e-6},
            ),
        ),
        preprocess_cfg=dict(
            mean=[0.5, 0.45, 0.4], std=[0.25, 0.3, 0.28],
            interpolation="bilinear", resize_mode="squash",
        ),
        dtype=torch.float16,
    ),
    "open-clip-rn": dict(
        model_cfg=dict(
            embed_dim=16,
            vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=8, head_width=16, patch_size=None),
            text_cfg=dict(context_length=77, vocab_size=49408, width=8, heads=2, layers=1),
        ),
        preprocess_cfg=dict(
            mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
            interpolation="bicubic", resize_mode="shortest",
        ),
        dtype=torch.float16,
    ),
}

# RGB photos at odd sizes (from make_preprocess_fixtures.py), paths under tests/fixtures, plus
# one 110x100 crop written here: at 32 px its shortest-edge resize is 35 wide, a crop margin of 3,
# where torchvision's half-to-even offset (2) differs from a floor (1).
IMAGES = ["images/astronaut.jpg", "images/rocket.jpg", "images/cat_tall.jpg", "images/coffee.webp",
          "open-clip-a/margin3.png"]

TEXTS = [
    "a photo of a cat",
    "A large RED circle on the left, and a small blue square at the top!",
    "",
    "naïve café — 東京 🚀 x²",
    " ".join(["a very long caption that goes on"] * 20),
]


def build(name, spec, seed):
    torch.manual_seed(seed)
    model = CLIP(**spec["model_cfg"]).eval()
    perturb_(model, seed + 1)
    # BatchNorm's running statistics are buffers, not parameters: make them non-trivial too.
    g = torch.Generator().manual_seed(seed + 2)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.2)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    # Round the weights to the storage dtype, then compute the reference in float32.
    model = model.to(spec["dtype"]).to(torch.float32)
    out_dir = os.path.dirname(fixture_path(name, "open_clip_config.json"))
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": spec["model_cfg"], "preprocess_cfg": spec["preprocess_cfg"]}, f, indent=2)
    state = {k: v.to(spec["dtype"]) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "open_clip_model.safetensors"))

    # Everything below goes through open_clip's own loader, tokenizer and transform.
    loaded, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out_dir)
    loaded = loaded.float().eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + out_dir)
    margin3 = os.path.join(ROOT, "tests", "fixtures", "open-clip-a", "margin3.png")
    if not os.path.exists(margin3):
        Image.open(os.path.join(ROOT, "tests", "fixtures", "images", "astronaut.jpg")).crop(
            (40, 60, 150, 160)).save(margin3)
    images = [Image.open(os.path.join(ROOT, "tests", "fixtures", n)) for n in IMAGES]
    pixels = torch.stack([preprocess(im) for im in images])
    ids = tokenizer(TEXTS)
    with torch.no_grad():
        img = loaded.encode_image(pixels, normalize=True)
        txt = loaded.encode_text(ids, normalize=True)
        logits = loaded.logit_scale.exp() * img @ txt.T
        if loaded.logit_bias is not None:
            logits = logits + loaded.logit_bias
    extra = {}
    if loaded.visual.__class__.__name__ == "ModifiedResNet":
        # Training form: BatchNorm with the batch's statistics, and the running statistics it
        # leaves behind (momentum 0.1, unbiased variance).
        loaded.train()
        with torch.no_grad():
            extra["train_image_features"] = loaded.encode_image(pixels)
        for key in ["bn1", "layer2.0.downsample.1", "layer4.0.bn3"]:
            bn = loaded.visual.get_submodule(key)
            extra[f"train_running_mean/visual.{key}"] = bn.running_mean.clone()
            extra[f"train_running_var/visual.{key}"] = bn.running_var.clone()
        loaded.eval()
    tensors = {
        **extra,
        "input_ids": ids.to(torch.int64),
        "pixel_values": pixels,
        "image_features": img,
        "text_features": txt,
        "logits": logits,
    }
    with open(os.path.join(out_dir, "inputs.json"), "w") as f:
        json.dump({"images": IMAGES, "texts": TEXTS}, f, ensure_ascii=False, indent=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, fixture_path(name + ".reference.safetensors"))
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    print("open_clip", open_clip.__version__, "torch", torch.__version__)
    for i, (name, spec) in enumerate(CONFIGS.items()):
        build(name, spec, seed=300 + 10 * i)
