"""Q-Former parity fixtures: tiny random Blip2ForImageTextRetrieval directories (use_qformer_text_input
true, as in the released ITM checkpoints) plus inputs and transformers' outputs.

Writes tests/fixtures/qformer-{a,b}/ (config.json, model.safetensors, preprocessor_config.json)
and tests/fixtures/qformer-{a,b}.reference.safetensors:

  image_embeds          vision last_hidden_state after post_layernorm (= LAVIS ln_vision) [Bi, N+1, Ev]
  query_output          Q-Former output of the queries alone over the image (ITC path)   [Bi, Q, H]
  text_output           Q-Former output of the text alone (ITC path)                      [Bt, T, H]
  itc_image_embeds      normalize(vision_projection(query_output))                         [Bi, Q, D]
  itc_text_embeds       normalize(text_projection(text_output[:, 0]))                      [Bt, D]
  itc_logits_per_image  max over queries of the cosine, no temperature                    [Bi, Bt]
  itm_pixel_rows        which image each ITM row pairs with its text
  itm_output            Q-Former output of [queries; text] over the image, bidirectional  [Bt, Q+T, H]
  itm_logits            itm_head averaged over the query outputs                          [Bt, 2]
  e2e_pixel_values      BlipImageProcessorPil on two odd-sized PNGs (resize straight, no crop)
  e2e_pixel_values_torchvision   the same through the default (torchvision) backend

  qformer-a: vision gelu, eps 1e-6, image 28 / patch 14; Q-Former 3 layers, cross-attention
             every 2nd layer, 4 queries.
  qformer-b: vision quick_gelu, eps 1e-5, image 30 / patch 10, non-default mean/std; Q-Former
             4 layers, cross-attention in every layer, 3 queries, different widths.

Every parameter is perturbed (transformers initialises the vision tower with std 1e-10 and the
query tokens with zeros, which would make the comparison vacuous).

Run:  .venv/bin/python tools/reference/make_qformer_fixtures.py
"""

import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from common import fixture_path

CONFIGS = {
    "qformer-a": dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
        ),
        qformer_config=dict(
            vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, cross_attention_frequency=2,
            use_qformer_text_input=True, pad_token_id=0,
        ),
        num_query_tokens=4, image_text_hidden_size=16,
        mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
    ),
    "qformer-b": dict(
        vision_config=dict(
            hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
            image_size=30, patch_size=10, layer_norm_eps=1e-5, qkv_bias=True, hidden_act="quick_gelu",
        ),
        qformer_config=dict(
            vocab_size=120, hidden_size=40, num_hidden_layers=4, num_attention_heads=5,
            intermediate_size=56, max_position_embeddings=32, cross_attention_frequency=1,
            use_qformer_text_input=True, pad_token_id=1,
        ),
        num_query_tokens=3, image_text_hidden_size=12,
        mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3],
    ),
}


def build(name, cfg, seed):
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=cfg["vision_config"], qformer_config=cfg["qformer_config"],
        num_query_tokens=cfg["num_query_tokens"], image_text_hidden_size=cfg["image_text_hidden_size"],
    )
    model = Blip2ForImageTextRetrieval(config).eval()
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            base = 1.0 if (p.dim() == 1 and ("layernorm" in n.lower() or "layer_norm" in n) and n.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + base)
    out_dir = os.path.dirname(fixture_path(name, "config.json"))
    model.save_pretrained(out_dir)
    size = cfg["vision_config"]["image_size"]
    proc = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=cfg["mean"], image_std=cfg["std"])
    proc.save_pretrained(out_dir)

    qc = cfg["qformer_config"]
    g = torch.Generator().manual_seed(seed + 2)
    pixel_values = torch.randn(2, 3, size, size, generator=g)
    bt, t = 3, 7
    ids = torch.randint(2, qc["vocab_size"], (bt, t), generator=g)
    mask = torch.ones(bt, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = qc["pad_token_id"]
    rows = torch.tensor([0, 1, 0])
    with torch.no_grad():
        itc = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, use_image_text_matching_head=False)
        itm = model(input_ids=ids, pixel_values=pixel_values[rows], attention_mask=mask, use_image_text_matching_head=True)
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        q = model.query_tokens.expand(2, -1, -1)
        query_output = model.qformer(
            query_embeds=q, encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        text_output = model.qformer(
            query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask,
        ).last_hidden_state
        ie = model.vision_model(pixel_values=pixel_values[rows]).last_hidden_state
        qe = model.embeddings(input_ids=ids, query_embeds=model.query_tokens.expand(bt, -1, -1))
        itm_output = model.qformer(
            query_embeds=qe, query_length=cfg["num_query_tokens"],
            attention_mask=torch.cat([torch.ones(bt, cfg["num_query_tokens"], dtype=torch.long), mask], 1),
            encoder_hidden_states=ie, encoder_attention_mask=torch.ones(ie.shape[:-1], dtype=torch.long),
        ).last_hidden_state

    rng = np.random.default_rng(seed + 3)
    images = []
    for i, (w, h) in enumerate([(45, 37), (23, 61)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = fixture_path(name + "-images", f"img{i}.png")
        Image.fromarray(arr).save(path)
        images.append(Image.open(path))
    e2e = proc(images=images, return_tensors="pt")["pixel_values"]
    tv = BlipImageProcessor(size={"height": size, "width": size}, image_mean=cfg["mean"], image_std=cfg["std"])
    e2e_tv = tv(images=images, return_tensors="pt")["pixel_values"]

    tensors = {
        "pixel_values": pixel_values,
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "image_embeds": image_embeds,
        "query_output": query_output,
        "text_output": text_output,
        "itc_image_embeds": itc.image_embeds,
        "itc_text_embeds": itc.text_embeds,
        "itc_logits_per_image": itc.logits_per_image,
        "itm_pixel_rows": rows.to(torch.int64),
        "itm_output": itm_output,
        "itm_logits": itm.logits_per_image,
        "e2e_pixel_values": e2e,
        "e2e_pixel_values_torchvision": e2e_tv,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, fixture_path(name + ".reference.safetensors"))
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})


CLI_TEXTS = ["a red circle", "the blue square on the left", "a big green star"]


def cli_reference(name):
    """A BERT WordPiece tokenizer over the model's vocabulary (saved as tokenizer.json), and what
    transformers gives for `vlalign itm` on img0.png against CLI_TEXTS: the ITM match probability
    (softmax of the ITM logits, class 1) and the ITC score (logits_per_image without temperature)."""
    import json
    from transformers import BertTokenizerFast
    out_dir = os.path.dirname(fixture_path(name, "config.json"))
    model = Blip2ForImageTextRetrieval.from_pretrained(out_dir).eval()
    model.set_attn_implementation("eager")
    v = model.config.qformer_config.vocab_size
    words = sorted({w for t in CLI_TEXTS for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [f"tok{i}" for i in range(v - len(vocab))]
    vocab_path = os.path.join(out_dir, "vocab.txt")
    with open(vocab_path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=vocab_path, do_lower_case=True)
    tok.save_pretrained(out_dir)
    for extra in ["vocab.txt", "special_tokens_map.json"]:
        if os.path.exists(os.path.join(out_dir, extra)):
            os.remove(os.path.join(out_dir, extra))
    proc = BlipImageProcessorPil.from_pretrained(out_dir)
    image = Image.open(fixture_path(name + "-images", "img0.png"))
    px = proc(images=[image] * len(CLI_TEXTS), return_tensors="pt")["pixel_values"]
    enc = tok(CLI_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        itm = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px,
                    use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
        itc = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px[:1],
                    use_image_text_matching_head=False).logits_per_image[0]
    ref = {"texts": CLI_TEXTS, "input_ids": enc["input_ids"].tolist(),
           "itm": [float(x) for x in itm], "itc": [float(x) for x in itc]}
    with open(fixture_path(name + ".cli.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(name, "cli", ref["itm"], ref["itc"])


if __name__ == "__main__":
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        build(name, cfg, seed=500 + 10 * i)
    cli_reference("qformer-a")
