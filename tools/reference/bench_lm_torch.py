"""PyTorch twin of `vlalign bench --suite lm`: greedy generation with transformers' KV cache on
the same LM (a GGUF loaded by transformers' own reader, dequantised to float32, or a model
directory), the same threads: a 16-token prompt (ids 1000..1015), 32 new tokens with no stop, at
batch 1 and 8; median of --iters after one untimed run. Prints one JSON line.

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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
