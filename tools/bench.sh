#!/usr/bin/env bash
# Runs `vlalign bench` and its PyTorch twin (tools/reference/bench_torch.py) one after the other
# on the same threads and prints the ratios (vlalign time / PyTorch time; below 1 = faster).
#   bash tools/bench.sh            (needs .venv from tools/reference/requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
cargo build --release -q
ours=$(RAYON_NUM_THREADS=$threads target/release/vlalign bench --json | tail -n 1)
theirs=$(.venv/bin/python tools/reference/bench_torch.py --threads "$threads" | tail -n 1)
python3 - "$ours" "$theirs" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for k, what in [("train_step_ms", "clip-tiny train step, batch 64"), ("vit_b32_batch8_ms", "ViT-B/32 embed, batch 8")]:
    print(f"{what:32s} vlalign {o[k]:8.1f} ms   PyTorch {t[k]:8.1f} ms   ratio {o[k] / t[k]:.2f}")
PY
