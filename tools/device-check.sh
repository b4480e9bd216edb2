#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (CUDA 13.0 driver, python3 with PyTorch and
# transformers; no network). It receives the repository with target/cuda/release/vlalign (from
# tools/build-cuda.sh) and the committed fixtures, and:
#   (a0) the fused CUDA kernels (LayerNorm, softmax, GELUs, bias; fused.cu; the GELUs, the
#       bias, the attention softmax, LayerNorm into bf16 and the residual add in bfloat16 too) against candle's compositions, values
#       and gradients, and AdamW's in-place passes against the composed update and, exactly,
#       against the CPU's (the same kernels run on the CPU in tools/check-fused-cu.sh);
#   (a) CUDA vs CPU parity: `embed` on the CLIP fixture and `itm` on the Q-Former fixture on
#       --device cuda within 1e-4 of the same binary on --device cpu;
#   (b) a short clip-tiny training on CUDA whose per-step losses equal the CPU run's within 1e-3,
#       and in mixed precision (train.precision = "bf16") within 2e-2;
#   (c) ViT-B/32 CLIP training throughput (batch 256, AdamW, text context 77) and image-embedding
#       throughput, vlalign beside PyTorch (tools/reference/bench_torch_gpu.py) on the same GPU,
#       with peak GPU memory, again in mixed precision (--precision bf16; PyTorch: autocast bf16),
#       then with gradient checkpointing too (--grad-checkpointing: its peak memory)
#       and again with the fused CUDA kernels (VLALIGN_FUSED_CUDA=1; float32, and bf16 with
#       fused.cu's bfloat16 activation and bias), and float32 once with the
#       driver's default memory-pool trimming (VLALIGN_CUDA_POOL_TRIM=1: what the pool setting
#       of src/nn/device.rs gains), and bf16 once with cudarc's event tracking off
#       (--cuda-events off: what an event per kernel argument costs on the host);
#       one JSON line.
# Exits non-zero on any mismatch. Output under ${OUT:-/tmp/device-check}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
BIN=${VLALIGN_CUDA_BIN:-target/cuda/release/vlalign}
BATCH=${BENCH_BATCH:-256}
# The device under test; CHECK_DEVICE=cpu dry-runs the plumbing on a machine without a GPU.
DEV=${CHECK_DEVICE:-cuda}
fail=0
say() { echo "device-check: $*" >&2; }

# The binary travels xz-compressed (the kernels it embeds make it ~66 MB; 9 MB compressed).
if [ ! -x "$BIN" ] && [ -f target/cuda/vlalign.xz ]; then
    mkdir -p "$(dirname "$BIN")"
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        target/cuda/vlalign.xz "$BIN" && chmod +x "$BIN"
fi

# The libraries the binary links: the driver's libcuda.so.1, and cuBLAS 13, cuRAND 10, NVRTC 13
# and the CUDA 13 runtime, which PyTorch's cu130 wheels carry (else a CUDA toolkit's).
site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
dirs=""
for d in $site; do dirs="$dirs $d/nvidia/cu13/lib $d/nvidia/cublas/lib $d/nvidia/curand/lib $d/nvidia/cuda_nvrtc/lib $d/nvidia/cuda_runtime/lib"; done
dirs="$dirs /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib"
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    ldconfig -p 2>/dev/null | grep -q "$lib " && continue
    for d in $dirs; do
        if [ -e "$d/$lib" ]; then
            case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
            break
        fi
    done
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
if ! "$BIN" --version >/dev/null; then
    say "cannot run $BIN (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
    ldd "$BIN" >&2
    exit 1
fi

# Largest |a - b| between two JSON documents' numbers at the same places.
maxdiff() {
    python3 - "$1" "$2" <<'PY'
import json, sys
def nums(v):
    if isinstance(v, bool) or v is None: return []
    if isinstance(v, (int, float)): return [float(v)]
    if isinstance(v, dict): return [x for k in sorted(v) for x in nums(v[k])]
    if isinstance(v, list): return [x for e in v for x in nums(e)]
    return []
a, b = (nums(json.load(open(p))) for p in sys.argv[1:3])
assert len(a) == len(b) and a, (len(a), len(b))
print(max(abs(x - y) for x, y in zip(a, b)))
PY
}

check() { # name value tolerance
    if python3 -c "import sys; sys.exit(0 if float('$2') <= $3 else 1)"; then
        say "ok   $1: $2 <= $3"
    else
        say "FAIL $1: $2 > $3"
        fail=1
    fi
}

# (a0) the fused kernels (LayerNorm, softmax, GELUs, bias, AdamW) against candle's compositions
#      on the device, values and gradients
timeout 120 "$BIN" bench --suite kernels --device "$DEV" --json >"$OUT/kernels.json" || fail=1
# The float32 kernels within float32's error (values 1e-5, gradients 1e-4, relative to the
# largest); the bfloat16 ones (rows "... bf16", from bf16-rounded inputs against the float32
# compositions) within 1e-2: bfloat16 keeps 8 bits, 2^-8 = 3.9e-3.
kernels=$(python3 - "$OUT/kernels.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["kernels"]
for r in rows:
    print(f"  {r['op']:16} values {r['value']:.2e}  gradients {r['grad']:.2e}", file=sys.stderr)
def scaled(r):
    if r["op"] == "adamw = cpu":
        # The CUDA AdamW passes round each operation as the CPU's do: equal, or a failure.
        return 0.0 if r["value"] == 0 and r["grad"] == 0 else float("inf")
    if r["op"].endswith("bf16"):
        return max(r["value"], r["grad"]) / 100
    return max(r["value"] * 10, r["grad"])
print(max(scaled(r) for r in rows))
PY
)
check "fused kernels vs compositions (max of 10 x value, gradient relative diff; bf16 rows / 100; adamw = cpu exact)" "${kernels:-inf}" 1e-4

# (a) parity
texts=(--text "a photo of a cat" "A large RED circle on the left, and a small blue square at the top!" "x")
for dev in cpu $DEV; do
    timeout 120 "$BIN" embed --model tests/fixtures/clip-b --image tests/fixtures/clip-b-images/img0.png \
        tests/fixtures/clip-b-images/img1.png "${texts[@]}" --json --device $dev >"$OUT/embed-$dev.json" || fail=1
    timeout 120 "$BIN" itm --model tests/fixtures/qformer-a --image tests/fixtures/qformer-a-images/img0.png \
        --text "a red circle" "the blue square on the left" "a big green star" --json --device $dev \
        >"$OUT/itm-$dev.json" || fail=1
done
check "embed clip-b $DEV vs cpu (max abs diff)" "$(maxdiff "$OUT/embed-cpu.json" "$OUT/embed-$DEV.json" || echo inf)" 1e-4
check "itm qformer-a $DEV vs cpu (max abs diff)" "$(maxdiff "$OUT/itm-cpu.json" "$OUT/itm-$DEV.json" || echo inf)" 1e-4

# Trains the config $2 for $3 steps on the CPU and on $DEV, into $OUT/$1-cpu and $OUT/$1-$DEV.
train_both() {
    for dev in cpu $DEV; do
        rm -rf "$OUT/$1-$dev"
        timeout 180 "$BIN" train --config "$2" --steps "$3" --out "$OUT/$1-$dev" --device $dev --json \
            >"$OUT/$1-$dev.json" 2>"$OUT/$1-$dev.log" || { fail=1; tail -5 "$OUT/$1-$dev.log" >&2; }
    done
}

# Largest |a - b| between the per-step losses of runs $OUT/$1-cpu and $OUT/$1-$DEV ($2 steps).
step_losses() {
    python3 - "$OUT" "$DEV" "$1" "$2" <<'PY'
import json, sys
d, dev, name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def rows(dev):
    return [r for r in map(json.loads, open(f"{d}/{name}-{dev}/metrics.jsonl")) if "loss" in r]
def losses(dev):
    return [r["loss"] for r in rows(dev)]
c, g = losses("cpu"), losses(dev)
print("cpu ", " ".join(f"{x:.6f}" for x in c), file=sys.stderr)
print(dev, " ".join(f"{x:.6f}" for x in g), file=sys.stderr)
print("host reads per step on", dev, [r.get("host_reads_per_step") for r in rows(dev)], file=sys.stderr)
print(max(abs(x - y) for x, y in zip(c, g)) if len(c) == len(g) == n else "inf")
PY
}

# (b) a short clip-tiny training, per-step losses
sed 's/^log_every = .*/log_every = 1/' configs/clip-tiny.toml >"$OUT/clip-tiny-log1.toml"
train_both train "$OUT/clip-tiny-log1.toml" 5
check "clip-tiny 5 steps, loss $DEV vs cpu (max abs diff)" "$(step_losses train 5 || echo inf)" 1e-3
# (b16) the same in mixed precision (train.precision = "bf16") on both devices: bfloat16
# products (cuBLAS on the GPU, widened to float32 on the CPU) round alike but for the order of
# their sums, so the losses agree to bfloat16's precision, not float32's.
sed -e 's/^log_every = .*/log_every = 1/' -e 's/^precision = .*/precision = "bf16"/' \
    configs/clip-tiny.toml >"$OUT/clip-tiny-bf16.toml"
train_both train-bf16 "$OUT/clip-tiny-bf16.toml" 5
check "clip-tiny 5 steps bf16, loss $DEV vs cpu (max abs diff)" "$(step_losses train-bf16 5 || echo inf)" 2e-2

# (b') BLIP-2 stage 1 (ITC + ITM + ITG, two shards on threads) on the clip-a fixture's tower
sed -e 's/^log_every = .*/log_every = 1/' -e 's|^vision_model = .*|vision_model = "tests/fixtures/clip-a"|' \
    configs/qformer-tiny.toml >"$OUT/qformer-log1.toml"
train_both q "$OUT/qformer-log1.toml" 3
# Largest |a - b| of the ITC, ITM and ITG terms of runs $OUT/$1-cpu and $OUT/$1-$DEV (3 steps).
q_terms() {
    python3 - "$OUT" "$DEV" "$1" <<'PY'
import json, sys
d, dev, name = sys.argv[1:4]
def terms(run):
    rows = [json.loads(l) for l in open(f"{d}/{name}-{run}/metrics.jsonl")]
    return [r[k] for r in rows if "loss" in r for k in ("itc", "itm", "itg")]
c, g = terms("cpu"), terms(dev)
print("cpu ", " ".join(f"{x:.5f}" for x in c), file=sys.stderr)
print(dev, " ".join(f"{x:.5f}" for x in g), file=sys.stderr)
print(max(abs(x - y) for x, y in zip(c, g)) if len(c) == len(g) == 9 else "inf")
PY
}
check "qformer-tiny 3 steps, ITC/ITM/ITG $DEV vs cpu (max abs diff)" "$(q_terms q || echo inf)" 1e-3
# ... and in mixed precision
sed -i 's/^precision = .*/precision = "bf16"/' "$OUT/qformer-log1.toml"
train_both q-bf16 "$OUT/qformer-log1.toml" 3
check "qformer-tiny 3 steps bf16, ITC/ITM/ITG $DEV vs cpu (max abs diff)" "$(q_terms q-bf16 || echo inf)" 2e-2

# (c) throughput beside PyTorch, with peak GPU memory sampled by nvidia-smi
peak_of() { # command... ; prints the command's stdout, leaves the peak MiB in $OUT/peak
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$OUT/mem.log" 2>/dev/null &
    local smi=$!
    "$@"
    local rc=$?
    kill $smi 2>/dev/null
    wait $smi 2>/dev/null
    sort -n "$OUT/mem.log" | tail -1 >"$OUT/peak"
    return $rc
}
ours=$(peak_of timeout 240 "$BIN" bench --suite vit-b32 --batch "$BATCH" --iters 10 --device "$DEV" --json) || fail=1
ours_peak=$(cat "$OUT/peak" 2>/dev/null || echo 0)
say "ViT-B/32 in mixed precision (--precision bf16):"
bf16=$(peak_of timeout 240 "$BIN" bench --suite vit-b32 --batch "$BATCH" --iters 10 --device "$DEV" \
    --precision bf16 --json) || fail=1
bf16_peak=$(cat "$OUT/peak" 2>/dev/null || echo 0)
echo "${bf16:-null}" >&2
say "peak MiB $bf16_peak"
say "ViT-B/32 in mixed precision with gradient checkpointing (--precision bf16 --grad-checkpointing):"
ckpt=$(peak_of timeout 240 "$BIN" bench --suite vit-b32 --batch "$BATCH" --iters 5 --device "$DEV" \
    --precision bf16 --grad-checkpointing --json) || fail=1
ckpt_peak=$(cat "$OUT/peak" 2>/dev/null || echo 0)
echo "${ckpt:-null}" >&2
say "peak MiB $ckpt_peak"
# The CUDA fused kernels (fused.cu) run only with VLALIGN_FUSED_CUDA=1 until this check has
# verified them on a GPU: (a0) above checks them against the compositions; this times them.
say "ViT-B/32 with the fused CUDA kernels (VLALIGN_FUSED_CUDA=1):"
fused=$(VLALIGN_FUSED_CUDA=1 peak_of timeout 240 "$BIN" bench --suite vit-b32 --batch "$BATCH" --iters 5 \
    --device "$DEV" --json) || fail=1
fused_peak=$(cat "$OUT/peak" 2>/dev/null || echo 0)
echo "${fused:-null}" >&2
say "peak MiB $fused_peak"
# ... and in mixed precision, where the activation and the biases run fused.cu's bf16 kernels
# (what becomes the default once (a0) passes).
say "ViT-B/32 in mixed precision with the fused CUDA kernels (VLALIGN_FUSED_CUDA=1 --precision bf16):"
fused16=$(VLALIGN_FUSED_CUDA=1 timeout 240 "$BIN" bench --suite vit-b32 --batch "$BATCH" --iters 5 \
    --device "$DEV" --precision bf16 --json) || fail=1
echo "${fused16:-null}" >&2
say "ViT-B/32 float32 with the driver's pool trimming (VLALIGN_CUDA_POOL_TRIM=1):"
trim=$(VLALIGN_CUDA_POOL_TRIM=1 timeout 240 "$BIN" bench --suite vit-b32 --batch "$BATCH" --iters 5 \
    --device "$DEV" --json) || fail=1
echo "${trim:-null}" >&2
say "ViT-B/32 in mixed precision without cudarc's event tracking (--cuda-events off):"
noev=$(timeout 240 "$BIN" bench --suite vit-b32 --batch "$BATCH" --iters 5 --device "$DEV" \
    --precision bf16 --cuda-events off --json) || fail=1
echo "${noev:-null}" >&2
theirs=$(timeout 240 python3 tools/reference/bench_torch_gpu.py --batch "$BATCH" --iters 10) || fail=1
python3 - "${ours:-null}" "${theirs:-null}" "$ours_peak" "${fused:-null}" "$fused_peak" "${bf16:-null}" "$bf16_peak" "${ckpt:-null}" "$ckpt_peak" "${trim:-null}" "${noev:-null}" "${fused16:-null}" <<'PY'
import json, sys
o, t, peak = json.loads(sys.argv[1]) or {}, json.loads(sys.argv[2]) or {}, float(sys.argv[3] or 0)
f, fpeak = json.loads(sys.argv[4]) or {}, float(sys.argv[5] or 0)
h, hpeak = json.loads(sys.argv[6]) or {}, float(sys.argv[7] or 0)
c, cpeak = json.loads(sys.argv[8]) or {}, float(sys.argv[9] or 0)
r = {"gpu": t.get("gpu"), "torch": t.get("torch"), "batch": o.get("batch"),
     "vlalign_train_f32_samples_per_s": o.get("train_samples_per_s"),
     "vlalign_embed_f32_images_per_s": o.get("embed_images_per_s"),
     "vlalign_peak_gpu_gib": round(peak / 1024, 2),
     "torch_train_f32_samples_per_s": t.get("train_f32_samples_per_s"),
     "torch_train_bf16_samples_per_s": t.get("train_bf16_samples_per_s"),
     "torch_embed_f32_images_per_s": t.get("embed_f32_images_per_s"),
     "torch_embed_bf16_images_per_s": t.get("embed_bf16_images_per_s"),
     "torch_train_f32_peak_gib": t.get("train_f32_peak_gib"),
     "torch_train_bf16_peak_gib": t.get("train_bf16_peak_gib")}
r["vlalign_fused_train_f32_samples_per_s"] = f.get("train_samples_per_s")
r["vlalign_fused_embed_f32_images_per_s"] = f.get("embed_images_per_s")
r["vlalign_fused_peak_gpu_gib"] = round(fpeak / 1024, 2)
r["vlalign_train_bf16_samples_per_s"] = h.get("train_samples_per_s")
r["vlalign_embed_bf16_images_per_s"] = h.get("embed_images_per_s")
r["vlalign_bf16_peak_gpu_gib"] = round(hpeak / 1024, 2)
r["vlalign_train_bf16_ckpt_samples_per_s"] = c.get("train_samples_per_s")
r["vlalign_bf16_ckpt_peak_gpu_gib"] = round(cpeak / 1024, 2)
trim = json.loads(sys.argv[10]) or {}
# One ViT-B/32 layer's pieces side by side (float32, ms): where a step's gap comes from.
theirs_ops = dict(t.get("ops_ms") or [])
for name, ms in o.get("ops_ms") or []:
    tm = theirs_ops.get(name)
    ratio = f"{tm / ms:5.2f}x" if tm else "  -  "
    print(f"  op {name:34} vlalign {ms:8.3f} ms  torch {tm if tm else float('nan'):8.3f} ms  {ratio}",
          file=sys.stderr)
r["vlalign_train_f32_pool_trim_samples_per_s"] = trim.get("train_samples_per_s")
noev = json.loads(sys.argv[11]) or {}
r["vlalign_train_bf16_no_events_samples_per_s"] = noev.get("train_samples_per_s")
fused16 = json.loads(sys.argv[12]) or {}
r["vlalign_fused_train_bf16_samples_per_s"] = fused16.get("train_samples_per_s")
r["vlalign_fused_embed_bf16_images_per_s"] = fused16.get("embed_images_per_s")
if fused16 and t:
    r["fused_train_bf16_ratio_vs_torch_bf16"] = (
        fused16["train_samples_per_s"] / t["train_bf16_samples_per_s"])
# AdamW's share of a step, composed and with its fused passes (train/adamw_fused.rs).
for key, run in (("f32", o), ("fused_f32", f), ("bf16", h), ("fused_bf16", fused16)):
    r[f"vlalign_{key}_optimizer_ms"] = run.get("train_optimizer_ms")
r["vlalign"], r["vlalign_fused"], r["vlalign_bf16"], r["torch_all"] = o, f, h, t
if h and t:
    r["train_bf16_ratio_vs_torch_bf16"] = h["train_samples_per_s"] / t["train_bf16_samples_per_s"]
    r["embed_bf16_ratio_vs_torch_bf16"] = h["embed_images_per_s"] / t["embed_bf16_images_per_s"]
if o and t:
    r["train_f32_ratio_vs_torch_f32"] = o["train_samples_per_s"] / t["train_f32_samples_per_s"]
    r["train_f32_ratio_vs_torch_bf16"] = o["train_samples_per_s"] / t["train_bf16_samples_per_s"]
    r["embed_f32_ratio_vs_torch_f32"] = o["embed_images_per_s"] / t["embed_f32_images_per_s"]
print(json.dumps(r))
PY
say "took ${SECONDS} s (the budget is 8 minutes)"
if [ $fail -ne 0 ]; then say "FAILED"; else say "all checks passed"; fi
exit $fail
