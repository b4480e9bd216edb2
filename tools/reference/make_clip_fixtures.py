"""CLIP parity fixtures: tiny random CLIPModel directories plus inputs and transformers' outputs.

Writes tests/fixtures/clip-{a,b}/ (config.json, model.safetensors, preprocessor_config.json) and
tests/fixtures/clip-{a,b}.reference.safetensors holding the inputs and the expected outputs.

  clip-a: quick_gelu, legacy eos_token_id = 2 (pooling at argmax of the ids), vocab 1000,
          image 32 / patch 8, float32 weights.
  clip-b: gelu, eos_token_id = 49407 (pooling at the first EOS), the real CLIP vocabulary
          (49408) so the bundled tokenizer drives it, image 30 / patch 6, layer_norm_eps 1e-6,
          weights stored as float16 (outputs computed in float32 from the same rounded weights).

Run:  .venv/bin/python tools/reference/make_clip_fixtures.py
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from common import ROOT, fixture_path, perturb_

CONFIGS = {
    "clip-a": dict(
        text_config=dict(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act="quick_gelu",
        ),
        projection_dim=24,
        logit_scale_init_value=2.0,
        mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3],
        dtype=torch.float32,
    ),
    "clip-b": dict(
        text_config=dict(
            vocab_size=49408, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
            layer_norm_eps=1e-6, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
            image_size=30, patch_size=6, hidden_act="gelu", layer_norm_eps=1e-6,
        ),
        projection_dim=20,
        logit_scale_init_value=3.1,
        mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
        dtype=torch.float16,
    ),
}

TEXTS = [
    "a photo of a cat",
    "A large RED circle on the left, and a small blue square at the top!",
    "",
    "naïve café — 東京 🚀 x²",
]


def clip_tokenizer():
    """The bundled tokenizer with the special tokens of openai/clip-vit-base-patch32's tokenizer_config."""
    return PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(ROOT, "assets", "clip", "tokenizer.json"),
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=77,
    )


def random_ids(g, cfg, batch=4):
    """Ids with the end-of-text token at varying positions and padding (and mask) after it."""
    text = cfg["text_config"]
    seq = min(text["max_position_embeddings"], 12)
    eos = text["eos_token_id"] if text["eos_token_id"] != 2 else text["vocab_size"] - 1
    ids = torch.randint(3, text["vocab_size"] - 2, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        end = seq - 1 - 2 * b
        ids[b, 0] = text["bos_token_id"]
        ids[b, end] = eos
        ids[b, end + 1 :] = text["pad_token_id"] if text["eos_token_id"] == 2 else eos
        mask[b, end + 1 :] = 0
    return ids, mask


def build(name, cfg, seed):
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=cfg["text_config"], vision_config=cfg["vision_config"],
        projection_dim=cfg["projection_dim"], logit_scale_init_value=cfg["logit_scale_init_value"],
    )
    model = CLIPModel(config).eval()
    perturb_(model, seed + 1)
    # Round the weights to the storage dtype, then compute the reference in float32.
    model = model.to(cfg["dtype"]).to(torch.float32)
    out_dir = fixture_path(name, "config.json")
    out_dir = os.path.dirname(out_dir)
    model.to(cfg["dtype"]).save_pretrained(out_dir)
    model = model.to(torch.float32)
    size = cfg["vision_config"]["image_size"]
    proc = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=cfg["mean"], image_std=cfg["std"],
    )
    proc.save_pretrained(out_dir)

    g = torch.Generator().manual_seed(seed + 2)
    pixel_values = torch.randn(3, 3, size, size, generator=g)
    input_ids, attention_mask = random_ids(g, cfg)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        image_features = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_features = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    tensors = {
        "pixel_values": pixel_values,
        "input_ids": input_ids.to(torch.int64),
        "attention_mask": attention_mask.to(torch.int64),
        "image_features": image_features,
        "text_features": text_features,
        "vision_last_hidden_state": out.vision_model_output.last_hidden_state,
        "text_last_hidden_state": out.text_model_output.last_hidden_state,
        "logits_per_image": out.logits_per_image,
    }

    if cfg["text_config"]["vocab_size"] == 49408:
        # End to end through the bundled tokenizer and the processor: what `vlalign embed` does.
        tok = clip_tokenizer()
        enc = tok(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        rng = np.random.default_rng(seed + 3)
        paths = []
        for i in range(2):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            path = fixture_path(name + "-images", f"img{i}.png")
            Image.fromarray(arr).save(path)
            paths.append(path)
        images = [Image.open(p) for p in paths]
        pv = proc(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            tensors["e2e_text_features"] = model.get_text_features(**enc).pooler_output
            tensors["e2e_image_features"] = model.get_image_features(pixel_values=pv).pooler_output
        with open(fixture_path(name + "-images", "texts.json"), "w") as f:
            json.dump(TEXTS, f, ensure_ascii=False, indent=1)

    save_file({k: v.contiguous() for k, v in tensors.items()}, fixture_path(name + ".reference.safetensors"))
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        build(name, cfg, seed=100 + 10 * i)
