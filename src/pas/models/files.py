"""Helpers for writing model folders reproducibly."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pas.hashing import sha256_file


def fingerprint_dir(path: str | Path, suffixes=(".safetensors", ".bin", ".pt", ".pth", ".json")) -> str:
    """sha256 over (relative name, content hash) of the weight/config files of a model folder."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators (torchvision/lightly transforms draw from them)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
