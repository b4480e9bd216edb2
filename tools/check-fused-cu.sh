#!/usr/bin/env bash
# Checks src/nn/fused.cu's CUDA kernels without a GPU: tools/cuda-emulate/check_fused.cpp runs
# each kernel on the CPU through a small model of CUDA's execution (cuda_shim.h: a block's
# threads are real threads, __syncthreads a barrier among them, a warp shuffle an exchange
# among its warp's 32), with the launch geometry and buffer sizes of src/nn/fused_cuda.rs,
# against double-precision references (finite differences for the gradients; the exact value
# rounded once for the bfloat16 kernels). Two passes: AddressSanitizer + UndefinedBehaviorSanitizer
# over every case (a read or write past a buffer stops it), then ThreadSanitizer over a few
# (a missing __syncthreads around shared memory is a reported race). What it cannot check —
# speed, the hardware's own arithmetic and memory model, and fused_cuda.rs's launch code
# itself — tools/device-check.sh (a0) checks on a GPU.
# Needs a C++20 compiler (g++ ≥ 11). About a minute and a half on 2 cores. Exits non-zero on
# any mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# -ffp-contract=off: no product and sum fused into one rounding (the `_rn` intrinsics' contract).
cxx=("${CXX:-c++}" -std=c++20 -O1 -g -ffp-contract=off -pthread tools/cuda-emulate/check_fused.cpp)
"${cxx[@]}" -fsanitize=address,undefined -fno-sanitize-recover=undefined -o "$out/asan" &
"${cxx[@]}" -fsanitize=thread -o "$out/tsan" &
wait -n && wait -n
echo "check-fused-cu: every case, under AddressSanitizer and UndefinedBehaviorSanitizer"
"$out/asan"
echo "check-fused-cu: a few cases, under ThreadSanitizer"
EMU_QUICK=1 TSAN_OPTIONS="halt_on_error=1 ${TSAN_OPTIONS:-}" "$out/tsan" | tail -n 1
