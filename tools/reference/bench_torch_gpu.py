"""The PyTorch twin of `vlalign bench --suite vit-b32` on a GPU: transformers' ViT-B/32 CLIPModel
(its default CLIPConfig: 224², patch 32, text context 77, vocabulary 49408) trained on random
batches with AdamW (lr 1e-4, betas 0.9/0.98, eps 1e-6, weight decay 0.1 on matrices), in float32
and under torch.autocast bf16, and image embedding (get_image_features, no grad); then one layer's
pieces as `vlalign bench --suite vit-b32` times them (`ops_ms`, same names). Prints one JSON
object: medians in ms, samples/s and peak GPU memory per workload.

  python3 tools/reference/bench_torch_gpu.py [--batch 256] [--iters 10]
"""

import argparse
import json
import statistics
import time

import torch
from transformers import CLIPConfig, CLIPModel


def timed(fn, warmup, iters):
    out = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def train(batch, iters, bf16):
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).cuda().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    pixels = torch.randn(batch, 3, 224, 224, device="cuda")
    ids = torch.randint(1, 49407, (batch, 77), device="cuda")
    ids[:, -1] = 49407

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.605170185988092)

    torch.cuda.reset_peak_memory_stats()
    ms = timed(step, 2, iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    torch.cuda.empty_cache()
    return ms, peak


def embed(batch, iters, bf16):
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).cuda().eval()
    pixels = torch.randn(batch, 3, 224, 224, device="cuda")

    def fwd():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model.get_image_features(pixel_values=pixels)
            # transformers 5 returns an output object whose pooler_output is the projection.
            feats = out if torch.is_tensor(out) else out.pooler_output
            feats.float().sum().item()

    ms = timed(fwd, 2, iters)
    del model
    torch.cuda.empty_cache()
    return ms


def layer_ops(batch, iters):
    """The rows of `vlalign bench --suite vit-b32`'s ops_ms, same names and shapes: one ViT-B/32
    layer's pieces forward + backward (float32), and fc1's product alone, forward."""
    t, h, heads = 50, 768, 12
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(h, 4 * h).cuda()
    ln = torch.nn.LayerNorm(h, eps=1e-5).cuda()
    x = torch.randn(batch, t, h, device="cuda", requires_grad=True)
    wide = torch.randn(batch, t, 4 * h, device="cuda", requires_grad=True)
    scores = torch.randn(batch, heads, t, t, device="cuda", requires_grad=True)

    def fb(f):
        def run():
            for p in (x, wide, scores, fc1.weight, fc1.bias, ln.weight, ln.bias):
                p.grad = None
            f().sum().backward()
        return run

    def attention():
        q = x.view(batch, t, heads, h // heads).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return o.transpose(1, 2).reshape(batch, t, h)

    rows = x.detach().reshape(batch * t, h)
    w = torch.randn(4 * h, h, device="cuda") * 0.02

    def matmul():
        with torch.no_grad():
            rows @ w.t()

    ops = [("linear 768->3072 (fc1)", fb(lambda: fc1(x))),
           ("layer_norm 768", fb(lambda: ln(x))),
           ("quick_gelu 3072", fb(lambda: wide * torch.sigmoid(1.702 * wide))),
           ("softmax 12x50x50", fb(lambda: torch.softmax(scores, -1))),
           ("attention 12 heads", fb(attention)),
           (f"matmul {batch * t}x{h}x{4 * h} (forward)", matmul)]
    return [[name, timed(f, 2, iters)] for name, f in ops]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "batch": a.batch,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    for name, bf16 in [("f32", False), ("bf16", True)]:
        ms, peak = train(a.batch, a.iters, bf16)
        out[f"train_{name}_step_ms"] = ms
        out[f"train_{name}_samples_per_s"] = a.batch / (ms / 1e3)
        out[f"train_{name}_peak_gib"] = peak
        ms = embed(a.batch, a.iters, bf16)
        out[f"embed_{name}_ms"] = ms
        out[f"embed_{name}_images_per_s"] = a.batch / (ms / 1e3)
    out["ops_ms"] = layer_ops(a.batch, a.iters)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
