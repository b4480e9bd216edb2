#!/usr/bin/env bash
# Builds vlalign with its `cuda` feature on a machine with no GPU and no system CUDA, from the
# CUDA 13.0 compiler and libraries that PyPI ships as wheels, and leaves the binary at
# target/cuda/release/vlalign (its own target dir: the CPU build in target/ stays).
#
# 13.0 because the GPU machines we run on have driver 580 (CUDA 13.0): PTX from a newer nvcc
# does not load there. The wheels and the build's target dir are cached outside the clone
# (VLALIGN_CACHE, default ~/.cache/vlalign) so later builds on one machine redo only what
# changed; a new machine builds from nothing.
#
# At run time the binary needs the driver's libcuda.so.1 and libcublas/libcublasLt (13),
# libcurand (10) and libnvrtc (13) on the library path: PyTorch's cu130 wheels carry them
# (tools/device-check.sh finds them), or use $VLALIGN_CACHE/cu13/nvidia/cu13/lib.
#
# VLALIGN_CUDA_FEATURES=cuda,nccl adds NCCL between the GPUs of an MPI job (dist/nccl.rs): it
# fetches PyPI's nvidia-nccl-cu13 (2.30, the version of cudarc's bindings) into
# $VLALIGN_CACHE/nccl and needs Open MPI and libclang (the `mpi` feature) on the build machine;
# that binary then needs libnccl.so.2 and libmpi at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${VLALIGN_CACHE:-$HOME/.cache/vlalign}
WHEELS=$CACHE/cu13
CU=$WHEELS/nvidia/cu13
TARGET=${VLALIGN_CUDA_TARGET:-$CACHE/cuda-target}
# .ci/run builds the dev profile into target/ (sharing the test build's dependencies), to check
# that the GPU path compiles and links; the binary for a GPU machine is the release one.
PROFILE=${VLALIGN_CUDA_PROFILE:-release}
FEATURES=${VLALIGN_CUDA_FEATURES:-cuda}
WHEEL_PINS=(
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)

if [ ! -x "$CU/bin/nvcc" ] || [ ! -f "$CU/lib/libcublasLt.so.13" ]; then
    echo "build-cuda: fetching the CUDA 13.0 wheels into $WHEELS" >&2
    python3 -m pip install -q --no-deps --target "$WHEELS" "${WHEEL_PINS[@]}"
fi

# Unversioned names for the linker (-lcublas ...); the wheels ship only the sonames.
for lib in cudart nvrtc cublas cublasLt curand; do
    so=$(cd "$CU/lib" && ls "lib$lib.so."* 2>/dev/null | grep -v alt | sort | head -1)
    [ -n "$so" ] || { echo "build-cuda: no lib$lib.so.* in $CU/lib" >&2; exit 1; }
    ln -sf "$so" "$CU/lib/lib$lib.so"
done

# No wheel ships libcuda.so (it comes with the driver). Link against a stub that defines every
# driver entry point cudarc's bindings declare, with the driver's soname, so that the real
# libcuda.so.1 is the one loaded at run time.
STUBS=$CU/lib/stubs
if [ ! -f "$STUBS/libcuda.so" ]; then
    cargo fetch --quiet
    bindings=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | sort | tail -1)
    mkdir -p "$STUBS"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$bindings" | sed 's/^pub unsafe fn //' | sort -u \
        | awk '{print "void " $1 "(void) {}"}' >"$STUBS/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/libcuda_stub.c"
fi

export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_PATH="$CU"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$CU/lib:$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CU/lib:$STUBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Without debug info: the binary travels to the GPU machine, whose transfers are size-limited.
export CARGO_PROFILE_RELEASE_DEBUG=0
if [[ ",$FEATURES," == *",nccl,"* ]]; then
    NCCL=$CACHE/nccl/nvidia/nccl
    if [ ! -f "$NCCL/lib/libnccl.so.2" ]; then
        echo "build-cuda: fetching NCCL into $CACHE/nccl" >&2
        python3 -m pip install -q --no-deps --target "$CACHE/nccl" nvidia-nccl-cu13==2.30.7
    fi
    ln -sf libnccl.so.2 "$NCCL/lib/libnccl.so"
    export LIBRARY_PATH="$NCCL/lib:$LIBRARY_PATH" LD_LIBRARY_PATH="$NCCL/lib:$LD_LIBRARY_PATH"
    export CPATH="$NCCL/include${CPATH:+:$CPATH}"
fi
# candle-kernels' nvcc jobs (cudaforge) use half the cores by default; nvcc is single-threaded.
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
cargo build --profile "$PROFILE" --features "$FEATURES" --target-dir "$TARGET" "$@"

if [ "$PROFILE" = release ]; then
    mkdir -p target/cuda/release
    cp "$TARGET/release/vlalign" target/cuda/release/vlalign
    # Stripped and xz-compressed (66 MB -> 9 MB) for carrying to a GPU machine, where
    # tools/device-check.sh unpacks it.
    strip -o target/cuda/vlalign.stripped target/cuda/release/vlalign
    xz -T0 -6 -f target/cuda/vlalign.stripped && mv -f target/cuda/vlalign.stripped.xz target/cuda/vlalign.xz
    ls -la target/cuda/release/vlalign target/cuda/vlalign.xz
fi
