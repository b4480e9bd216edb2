"""Loads a directory written by `vlalign convert` (from tests/fixtures/open-clip-a) in transformers
and compares its normalised features on the fixture's pixels and texts with open_clip's
(tests/fixtures/open-clip-a.reference.safetensors). Exits 1 above 1e-4.

  cargo test --test open_clip convert      # writes target/tmp/open-clip-convert/hf-a
  .venv/bin/python tools/reference/check_open_clip_convert.py [DIR]
"""

import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import CLIPModel, PreTrainedTokenizerFast

from common import ROOT


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "tmp", "open-clip-convert", "hf-a")
    model = CLIPModel.from_pretrained(d).eval()
    ref = load_file(os.path.join(ROOT, "tests", "fixtures", "open-clip-a.reference.safetensors"))
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"), pad_token="<|endoftext|>")
    with open(os.path.join(ROOT, "tests", "fixtures", "open-clip-a", "inputs.json")) as f:
        texts = json.load(f)["texts"]
    enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=ref["pixel_values"]).pooler_output
        txt = model.get_text_features(**enc).pooler_output
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)
    di = (norm(img) - ref["image_features"]).abs().max().item()
    dt = (norm(txt) - ref["text_features"]).abs().max().item()
    print(f"transformers {transformers.__version__}: image features max abs diff {di:.3e}, text {dt:.3e}")
    sys.exit(0 if max(di, dt) <= 1e-4 else 1)


if __name__ == "__main__":
    main()
