"""FLOPs of the PyTorch twins' benchmark iterations as torch.utils.flop_counter.FlopCounterMode
counts them, into tests/fixtures/bench_flops.json: the independent reference of vlalign's
shape-based counts (src/apps/bench/flops.rs).

  .venv/bin/python tools/reference/make_flop_fixtures.py
"""

import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import setup  # noqa: E402


def main():
    torch.set_num_threads(2)
    out = {"torch": torch.__version__}
    for name in ("clip_tiny_train", "siglip_train", "clip_rn_train", "vit_b32_embed", "qformer_train"):
        torch.manual_seed(0)
        step, _ = setup(name)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        out[name] = counter.get_total_flops()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    with open(os.path.join(root, "tests", "fixtures", "bench_flops.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
