"""The PyTorch twin of `vlalign bench`: the same clip-tiny train step (forward + backward + AdamW,
batch 64) and ViT-B/32 image embedding (224², batch 8, forward only), with transformers' CLIP
classes, on the same number of CPU threads. Prints one JSON object with the medians in ms.

  .venv/bin/python tools/reference/bench_torch.py [--threads 2] [--iters 10]
"""

import argparse
import json
import statistics
import time

import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel


def clip_tiny():
    return CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=32, eos_token_id=999,
                         bos_token_id=0, pad_token_id=0, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=64, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=256,
    )


def timed(fn, warmup, iters):
    out = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            out.append((time.perf_counter() - t) * 1e3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    model = CLIPModel(clip_tiny()).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    pixels = torch.randn(64, 3, 64, 64)
    ids = torch.randint(1, 999, (64, 32))
    ids[:, -1] = 999

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.605170185988092)

    train = timed(step, 2, a.iters)

    vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=32)).eval()
    px = torch.randn(8, 3, 224, 224)

    def embed():
        with torch.inference_mode():
            vit(pixel_values=px).pooler_output.sum().item()

    infer = timed(embed, 2, a.iters)
    print(json.dumps({
        "threads": a.threads, "torch": torch.__version__,
        "train_step_ms": statistics.median(train), "train_step_ms_all": train,
        "vit_b32_batch8_ms": statistics.median(infer), "vit_b32_batch8_ms_all": infer,
    }))


if __name__ == "__main__":
    main()
