"""The PyTorch twins of `vlalign bench` (src/apps/bench): the same rows on the same number of CPU
threads, each run in a process of its own (its peak memory is its own), each after `--warmup`
untimed iterations the median of `--iters`.

- clip_tiny_train: transformers' CLIPModel, clip-tiny (images 64², patch 8, width 256, 4 layers,
  4 heads, MLP 1024; text vocab 1000, context 32, width 256, 4 layers; projection 256), batch 64,
  forward + backward + AdamW (lr 1e-4, betas (0.9, 0.98), eps 1e-6, wd 0.1 on matrices).
- siglip_train: the same towers with the sigmoid loss (Zhai et al. 2023; learned scale from ln 10
  and bias from -10, as vlalign's objectives/contrastive.rs).
- clip_rn_train: open_clip's CLIP with a ModifiedResNet image tower as configs/clip-tiny-rn.toml
  (images 64², layers [1, 1, 1, 1], width 16, 8 attention-pooling heads; text vocab 1000,
  context 32, width 64, 2 layers, 2 heads, MLP 256; embed 128, QuickGELU), batch 64, InfoNCE,
  train mode (BatchNorm on batch statistics), AdamW as above.
- qformer_train: BLIP-2 stage 1 on qformer-tiny (bench_qformer_torch.py says how).
- vit_b32_embed: CLIPVisionModel ViT-B/32, 224², batch 8, forward under inference_mode.

Each row also carries one iteration's FLOPs as torch.utils.flop_counter.FlopCounterMode counts
them (matrix products; tools/bench.sh prints them beside vlalign's own count), the process's peak
resident memory (VmHWM) and the resident growth over the timed iterations. The run ends with one
JSON object: {"threads", "torch", "matmul_peak_gflops", "rows": [...]}.

  .venv/bin/python tools/reference/bench_torch.py [--threads 2] [--warmup 3] [--iters 20]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

ROWS = ["clip_tiny_train", "siglip_train", "clip_rn_train", "qformer_train", "vit_b32_embed"]


def clip_tiny():
    return CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=32, eos_token_id=999,
                         bos_token_id=0, pad_token_id=0, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=64, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=256,
    )


def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    return None


def adamw(params):
    """AdamW as vlalign's benchmark step: weight decay 0.1 on matrices but embeddings."""
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.98), eps=1e-6)


def random_batch():
    """64 images of 64² in [-2, 2) and 64 texts of 32 tokens over a vocabulary of 1000 (EOS 999 last)."""
    pixels = torch.rand(64, 3, 64, 64) * 4.0 - 2.0
    ids = torch.randint(1, 999, (64, 32))
    ids[:, -1] = 999
    return pixels, ids


def clip_step(siglip):
    model = CLIPModel(clip_tiny()).train()
    bias = None
    if siglip:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
        bias = torch.nn.Parameter(torch.tensor(-10.0))
    opt = adamw(list(model.named_parameters()) + ([("logit_bias", bias)] if siglip else []))
    pixels, ids = random_batch()

    def step():
        opt.zero_grad(set_to_none=True)
        if siglip:
            out = model(input_ids=ids, pixel_values=pixels)
            logits = out.image_embeds @ out.text_embeds.t() * model.logit_scale.exp() + bias
            labels = 2.0 * torch.eye(64) - 1.0
            loss = -F.logsigmoid(labels * logits).sum() / 64
        else:
            loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.605170185988092)

    return step


def clip_rn_step():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = open_clip.CLIP(
        embed_dim=128,
        vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=64, image_size=64),
        text_cfg=CLIPTextCfg(context_length=32, vocab_size=1000, width=64, heads=2, layers=2, mlp_ratio=4.0),
        quick_gelu=True,
    ).train()
    opt = adamw(list(model.named_parameters()))
    pixels, ids = random_batch()
    labels = torch.arange(64)

    def step():
        opt.zero_grad(set_to_none=True)
        img, txt, scale = model(pixels, ids)
        logits = scale * img @ txt.t()
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.605170185988092)

    return step


def vit_b32_step():
    vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=32)).eval()
    px = torch.randn(8, 3, 224, 224)

    def embed():
        with torch.inference_mode():
            vit(pixel_values=px).pooler_output.sum().item()

    return embed


def setup(name):
    if name in ("clip_tiny_train", "siglip_train"):
        return clip_step(name == "siglip_train"), 64
    if name == "clip_rn_train":
        return clip_rn_step(), 64
    if name == "qformer_train":
        from bench_qformer_torch import BATCH, qformer_setup
        return qformer_setup(torch.get_num_threads()), BATCH
    if name == "vit_b32_embed":
        return vit_b32_step(), 8
    raise SystemExit(f"no row {name!r} (rows: {', '.join(ROWS)})")


def run_row(name, warmup, iters):
    torch.manual_seed(0)
    step, samples = setup(name)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times, warm_rss = [], None
    for i in range(warmup + iters):
        if i == warmup:
            warm_rss = status_mb("VmRSS:")
        t = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    gflop = counter.get_total_flops() / 1e9
    return {"name": name, "ms": ms, "ms_all": times, "samples": samples, "samples_per_s": samples / (ms / 1e3),
            "gflop": gflop, "gflops": gflop / (ms / 1e3), "peak_rss_mb": status_mb("VmHWM:"),
            "rss_growth_mb": status_mb("VmRSS:") - warm_rss}


def matmul_peak():
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for i in range(12):
            t = time.perf_counter()
            a @ b
            if i >= 2:
                times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", help="run this row in this process and print it (peak: the matmul peak)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.only == "peak":
        print(json.dumps({"matmul_peak_gflops": matmul_peak()}))
        return
    if a.only:
        print(json.dumps(run_row(a.only, a.warmup, a.iters)))
        return
    rows = []
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ROWS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", name, "--threads",
                              str(a.threads), "--warmup", str(a.warmup), "--iters", str(a.iters)],
                             check=True, capture_output=True, text=True, cwd=here)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"threads": a.threads, "torch": torch.__version__, "matmul_peak_gflops": matmul_peak(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
