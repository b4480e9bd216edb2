"""Check a CLIP model directory in transformers against `vlalign embed --json`.

Loads DIR with transformers (CLIPModel, the directory's image processor — the default, torchvision
backend — and its tokenizer.json), embeds the given images and texts both ways and prints the max
abs difference and the min cosine of the L2-normalised embeddings. Exits 1 when the differences
exceed the stated tolerance: 1e-4 max abs diff (or, with --resized, cosine >= 0.9995 for images
that the processor must resize).

  cargo build --release
  cargo test --test model_dir          # writes target/tmp/roundtrip-clip-a (saved from candle)
  .venv/bin/python tools/reference/check_model_dir.py --model target/tmp/roundtrip-clip-a \\
      --image tests/fixtures/clip-b-images/img0.png --text "a photo of a cat" "a dog"
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, PreTrainedTokenizerFast

from common import ROOT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", nargs="*", default=[])
    ap.add_argument("--text", nargs="*", default=[])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "vlalign"))
    ap.add_argument("--resized", action="store_true", help="images need resizing: compare by cosine")
    a = ap.parse_args()

    model = CLIPModel.from_pretrained(a.model).eval()
    cmd = [a.bin, "embed", "--model", a.model, "--json"]
    if a.image:
        cmd += ["--image", *a.image]
    if a.text:
        cmd += ["--text", *a.text]
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ok = True
    with torch.no_grad():
        if a.image:
            proc = AutoImageProcessor.from_pretrained(a.model)
            pv = proc(images=[Image.open(p) for p in a.image], return_tensors="pt")["pixel_values"]
            ref = model.get_image_features(pixel_values=pv).pooler_output
            ok &= report("image", ref, [x["embedding"] for x in ours["images"]], a.resized)
        if a.text:
            tok = PreTrainedTokenizerFast(
                tokenizer_file=os.path.join(a.model, "tokenizer.json"),
                bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
            )
            ctx = model.config.text_config.max_position_embeddings
            enc = tok(a.text, padding=True, truncation=True, max_length=ctx, return_tensors="pt")
            ref = model.get_text_features(**enc).pooler_output
            ok &= report("text", ref, [x["embedding"] for x in ours["texts"]], False)
    sys.exit(0 if ok else 1)


def report(what, ref, ours, by_cosine):
    ref = torch.nn.functional.normalize(ref, dim=-1)
    ours = torch.tensor(ours)
    diff = (ref - ours).abs().max().item()
    cos = (ref * ours).sum(-1).min().item()
    ok = cos >= 0.9995 if by_cosine else diff <= 1e-4
    print(f"{what}: {len(ours)} embeddings, max abs diff {diff:.3e}, min cosine {cos:.7f} -> {'OK' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    main()
