"""Helpers shared by the fixture generators (pinned stack: tools/reference/requirements.txt)."""

import os

import torch

torch.set_num_threads(2)

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def perturb_(model, seed, scale=0.05):
    """Add seeded noise to every parameter so that biases, norms and embeddings are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def fixture_path(*parts):
    path = os.path.join(FIXTURES, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
