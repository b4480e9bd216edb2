"""PyTorch twin of `vlalign bench --suite lm`: greedy generation with transformers' KV cache on
the same LM (a GGUF loaded by transformers' own reader, dequantised to float32, or a model
directory), the same threads: a 16-token prompt (ids 1000..1015), 32 new tokens with no stop, at
batch 1 and 8; median of --iters after one untimed run. And the LM's share of a BLIP-2 stage-2
training step: 8 rows of 8 fixed query vectors (width 128, sin(0.37 i)) through a trained
projection (0.02 cos(0.11 i), no bias) in front of 24 text tokens (ids 1000..1023), the summed
cross-entropy of the last 16 text tokens, backward through the frozen LM (requires_grad off) to
the projection. Prints one JSON line.

Run:  .venv/bin/python tools/reference/bench_lm_torch.py --model target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

PROMPT, NEW = 16, 32
ROWS, QUERIES, QWIDTH, TEXT, TARGETS = 8, 8, 128, 24, 16


def step_ms(model, iters):
    width = model.get_input_embeddings().weight.shape[1]
    for p in model.parameters():
        p.requires_grad_(False)
    i = torch.arange(ROWS * QUERIES * QWIDTH, dtype=torch.float32)
    queries = torch.sin(0.37 * i).reshape(ROWS, QUERIES, QWIDTH)
    j = torch.arange(width * QWIDTH, dtype=torch.float32)
    proj = torch.nn.Parameter((0.02 * torch.cos(0.11 * j)).reshape(width, QWIDTH))
    ids = torch.arange(1000, 1000 + TEXT).repeat(ROWS, 1)
    length = QUERIES + TEXT
    labels = torch.full((ROWS, length), -100)
    labels[:, length - TARGETS:] = ids[:, TEXT - TARGETS:]

    def run():
        proj.grad = None
        embeds = torch.cat([queries @ proj.t(), model.get_input_embeddings()(ids)], dim=1)
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones(ROWS, length)).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum")
        loss.backward()

    run()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(a.model))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    out = {"model": a.model, "prompt_tokens": PROMPT, "new_tokens": NEW}
    for b in (1, 8):
        ids = torch.arange(1000, 1000 + PROMPT).repeat(b, 1)

        def run():
            with torch.no_grad():
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                )

        run()
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times)
        out[f"batch{b}_ms"] = ms
        out[f"batch{b}_tokens_per_s"] = b * NEW / (ms / 1e3)
    out["step_batch8_ms"] = step_ms(model, a.iters)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
