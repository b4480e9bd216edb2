#!/usr/bin/env bash
# Longer runs of the property suite (tests/fuzz.rs): every reader of user bytes (images,
# safetensors, config.json, preprocessor_config.json, TOML configs, manifests, tar shards,
# tokenizer input) on many seeded mutations of valid inputs; a failure names the reader, the
# case and its seed. `cargo test` runs the same with a few hundred cases per reader.
#   bash tools/fuzz.sh [CASES]     (default 5000 per reader; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
VLALIGN_FUZZ_CASES=${1:-5000} cargo test --release --test fuzz -- --nocapture
