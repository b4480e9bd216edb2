#!/usr/bin/env bash
# The benchmark table: `vlalign bench` and its PyTorch twins (tools/reference/bench_torch.py,
# bench_qformer_torch.py) on the same threads, row by row — each row's vlalign and PyTorch runs
# back to back (this machine's speed drifts over minutes), each in a process of its own, after
# WARMUP untimed iterations the median of ITERS; ratio = vlalign time / PyTorch time (below 1 =
# vlalign faster); GFLOP/s from each side's own FLOP count (vlalign's from the shapes, PyTorch's
# from FlopCounterMode; the GFLOP column shows both) as a fraction of the machine's float32
# matmul peak (the better of the two sides' measurements). With target/smollm2 present
# (tools/fetch_smollm2.sh) the BLIP-2 stage-2 rows follow (bench --suite lm and its twin).
#   bash tools/bench.sh            (needs .venv from tools/reference/requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
iters=${ITERS:-20}
warmup=${WARMUP:-3}
cargo build --release -q
ours() { RAYON_NUM_THREADS=$threads target/release/vlalign bench --json --iters "$iters" --warmup "$warmup" --only "$1" | tail -n 1; }
theirs() { .venv/bin/python tools/reference/bench_torch.py --threads "$threads" --iters "$iters" --warmup "$warmup" --only "$1" | tail -n 1; }
pairs="[$(ours peak),$(theirs peak)"
for row in clip_tiny_train siglip_train clip_rn_train qformer_train vit_b32_embed; do
  pairs="$pairs,$(ours $row),$(theirs $row)"
done
for row in loader_shapes loader_jpeg; do
  pairs="$pairs,$(ours $row),null"
done
pairs="$pairs]"
lm_ours=null
lm_theirs=null
gguf=target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$gguf" ]; then
  lm_ours=$(RAYON_NUM_THREADS=$threads target/release/vlalign bench --suite lm --iters 3 --json | tail -n 1)
  lm_theirs=$(.venv/bin/python tools/reference/bench_lm_torch.py --model "$gguf" --threads "$threads" --iters 3 2>/tmp/bench_lm_torch.err | tail -n 1) || { echo "bench_lm_torch.py failed: see /tmp/bench_lm_torch.err" >&2; exit 1; }
fi
python3 - "$pairs" "$lm_ours" "$lm_theirs" "$iters" "$warmup" "$threads" <<'PY'
import json, sys
v = json.loads(sys.argv[1])
lo, lt = json.loads(sys.argv[2]), json.loads(sys.argv[3])
iters, warmup, threads = sys.argv[4:7]
po, pt = v[0]["matmul_peak_gflops"], v[1]["matmul_peak_gflops"]
peak = max(po, pt)
print(f"threads {threads}; float32 matmul peak {peak:.0f} GFLOP/s (vlalign {po:.0f}, PyTorch {pt:.0f}); "
      f"median of {iters} after {warmup} warm-up")
print("| workload | vlalign ms | PyTorch ms | ratio | GFLOP vlalign / PyTorch | vlalign % of peak | PyTorch % of peak "
      "| peak RSS MiB vlalign / PyTorch | RSS growth MiB vlalign / PyTorch |")
print("|---|---|---|---|---|---|---|---|---|")
for r, p in zip(v[2::2], v[3::2]):
    if p is None:
        print(f"| {r['what']} | {r['ms']:.1f} ({r['samples_per_s']:.0f} samples/s) | - | - | - | - | - | "
              f"{r['peak_rss_mb']:.0f} / - | {r['rss_growth_mb']:.1f} / - |")
        continue
    print(f"| {r['what']} | {r['ms']:.1f} | {p['ms']:.1f} | {r['ms'] / p['ms']:.2f} | {r['gflop']:.1f} / {p['gflop']:.1f} "
          f"| {100 * r['gflops'] / peak:.0f}% | {100 * p['gflops'] / peak:.0f}% "
          f"| {r['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.1f} / {p['rss_growth_mb']:.1f} |")
if lo and lt:
    for k, what in [("step_batch8_sharded_ms", "stage-2 step, LM share, batch 8 (two row shards)"),
                    ("batch1_ms", "SmolLM2 greedy generation, batch 1"),
                    ("batch8_ms", "SmolLM2 greedy generation, batch 8")]:
        tk = "step_batch8_ms" if k.startswith("step") else k
        print(f"| {what} | {lo[k]:.1f} | {lt[tk]:.1f} | {lo[k] / lt[tk]:.2f} | - | - | - | - | - |")
PY
