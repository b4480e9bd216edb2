"""Decoding fixtures for the image kinds PIL reads in its own way: a CMYK JPEG (PIL assumes
Adobe's inverted CMYK) and 16-bit PNGs (grey is clipped to 255 by PIL's I;16 -> RGB conversion;
RGB/RGBA/grey+alpha keep the high byte). Beside each image, `<name>.rgb.png` holds what
transformers' `convert_to_rgb` makes of it (`PIL.Image.open(p).convert("RGB")`, or through RGBA
alpha-composited onto white where there is alpha), as an 8-bit RGB PNG that decodes losslessly.

Writes tests/fixtures/images/decode/*. Only Pillow and numpy are needed (pinned in
requirements.txt).

Run:  .venv/bin/python tools/reference/make_decode_fixtures.py
"""

import os
import struct
import zlib

import numpy as np
from PIL import Image

# Not common.py: that one needs torch, and these fixtures need only Pillow.
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "images", "decode")

W, H = 37, 23


def pattern(channels, depth_max, seed):
    """Smooth gradients plus noise over the whole range, so clipping and rounding both show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    out = []
    for c in range(channels):
        base = (x / (W - 1) * 0.6 + y / (H - 1) * 0.4 + 0.13 * c) % 1.0
        noise = rng.uniform(-0.05, 0.05, size=(H, W))
        out.append(np.clip(base + noise, 0, 1) * depth_max)
    return np.stack(out, axis=-1)


def png16(path, arr, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write every 16-bit mode)."""
    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def convert_to_rgb(im):
    """transformers' image_transforms.convert_to_rgb: alpha composited onto white."""
    if im.mode == "RGB":
        return im
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def main():
    os.makedirs(OUT, exist_ok=True)
    made = []
    cmyk = pattern(4, 255, 1).astype(np.uint8)
    p = os.path.join(OUT, "cmyk.jpg")
    Image.fromarray(cmyk, "CMYK").save(p, quality=90)
    made.append(p)
    for name, channels, color_type, seed in [
        ("grey16.png", 1, 0, 2),
        ("rgb16.png", 3, 2, 3),
        ("grey_alpha16.png", 2, 4, 4),
        ("rgba16.png", 4, 6, 5),
    ]:
        # Grey spans 0..600 so that both sides of PIL's clip at 255 appear.
        top = 600 if channels == 1 else 65535
        arr = pattern(channels, top, seed).round().astype(np.uint16)
        # Exact values where PIL's rules and a rounded /257 scaling disagree.
        arr[0, :6, 0] = [0x00FF, 0x0100, 0x80FF, 0x7F80, 0xFFFF, 0x0080]
        arr[1, :3, 0] = [254, 255, 256]
        if channels in (2, 4):
            arr[..., -1] = np.maximum(arr[..., -1], 0x4000)
        p = os.path.join(OUT, name)
        png16(p, arr, color_type)
        made.append(p)
    for p in made:
        im = Image.open(p)
        rgb = convert_to_rgb(im)
        rgb.save(p + ".rgb.png")
        print(os.path.basename(p), im.mode, "->", rgb.mode, np.asarray(rgb)[0, :3].tolist())


if __name__ == "__main__":
    main()
