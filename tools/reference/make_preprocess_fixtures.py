"""Image preprocessing fixtures: real photos from scikit-image at odd sizes in PNG (RGB, gray,
RGBA, palette with transparency), JPEG and WebP, and what transformers' CLIPImageProcessor
(v5 default: the torchvision backend) makes of them.

Writes tests/fixtures/images/*.{png,jpg,webp} and tests/fixtures/preprocess.reference.safetensors:
  crop224/<name>: uint8 [3, 224, 224], default processor with do_rescale/do_normalize off (the
                  8-bit resize + centre crop, before the float steps);
  pil_patch_{index,value}/<name>: where CLIPImageProcessorPil's crop differs from crop224/<name>,
                  and its values there (so the PIL backend's crop is stored in a few hundred bytes);
  small/<name>:   float32 [3, 64, 56], full pipeline with shortest_edge 72, crop 64x56 and
                  non-default mean/std.
Also prints how far the PIL backend (CLIPImageProcessorPil) is from the torchvision one.

Run:  .venv/bin/python tools/reference/make_preprocess_fixtures.py
"""

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from transformers import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from common import fixture_path

SMALL = dict(
    size={"shortest_edge": 72}, crop_size={"height": 64, "width": 56},
    image_mean=[0.45, 0.5, 0.55], image_std=[0.22, 0.3, 0.25],
)


def make_images():
    out = {}
    a = data.astronaut()
    Image.fromarray(a[50:351, 60:317]).save(p := fixture_path("images", "astronaut.jpg"), quality=92)
    out["astronaut.jpg"] = p
    Image.fromarray(data.coffee()[:211, :317]).save(p := fixture_path("images", "coffee.webp"), quality=85)
    out["coffee.webp"] = p
    pal = Image.fromarray(data.chelsea()[:131, :180]).quantize(64)
    pal.save(p := fixture_path("images", "chelsea_palette.png"), transparency=0)
    out["chelsea_palette.png"] = p
    Image.fromarray(data.camera()[100:273, 150:361]).save(p := fixture_path("images", "camera_gray.png"))
    out["camera_gray.png"] = p
    Image.fromarray(data.rocket()[:, 100:543]).save(p := fixture_path("images", "rocket.jpg"), quality=90)
    out["rocket.jpg"] = p
    rgba = np.dstack([a[:123, :160], np.tile(np.linspace(0, 255, 160).astype(np.uint8), (123, 1))])
    Image.fromarray(rgba, "RGBA").save(p := fixture_path("images", "astronaut_rgba.png"))
    out["astronaut_rgba.png"] = p
    Image.fromarray(np.ascontiguousarray(data.cat().transpose(1, 0, 2))).save(
        p := fixture_path("images", "cat_tall.jpg"), quality=88
    )
    out["cat_tall.jpg"] = p
    Image.fromarray(data.chelsea()[100:123, 200:237]).save(p := fixture_path("images", "tiny.png"))
    out["tiny.png"] = p
    return out


def main():
    images = make_images()
    tv = CLIPImageProcessor()
    pil = CLIPImageProcessorPil()
    tv_small = CLIPImageProcessor(**SMALL)
    tensors = {}
    for name, path in images.items():
        img = Image.open(path)
        crop = tv(images=[img], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
        assert crop.dtype == torch.uint8, crop.dtype
        tensors[f"crop224/{name}"] = crop.contiguous()
        ref_pil = pil(images=[Image.open(path)], do_rescale=False, do_normalize=False, return_tensors="pt")
        pil_crop = ref_pil["pixel_values"][0].to(torch.uint8).flatten()
        d = (pil_crop.to(torch.int32) - crop.flatten().to(torch.int32)).abs()
        # The PIL backend's crop, stored as the few values where it differs from the default one.
        idx = torch.nonzero(d).flatten()
        tensors[f"pil_patch_index/{name}"] = idx.to(torch.int64)
        tensors[f"pil_patch_value/{name}"] = pil_crop[idx].contiguous()
        print(f"{name:22s} {img.mode:5s} {img.size}: PIL vs torchvision backend: max {d.max().item()} levels, "
              f"{(d > 0).float().mean().item() * 100:.2f}% of values differ")
        tensors[f"small/{name}"] = tv_small(images=[Image.open(path)], return_tensors="pt")["pixel_values"][0]
    save_file(tensors, fixture_path("preprocess.reference.safetensors"))
    with open(fixture_path("images", "small_preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "resample": 3, **SMALL}, f, indent=1)


if __name__ == "__main__":
    main()
