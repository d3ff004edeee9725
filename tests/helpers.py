"""Small helpers shared by test modules (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from pas.data.chunks import load_chunk, plan_chunks
from pas.hashing import sha256_file
from pas.io.manifest import run_path


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file below `root` (subdirectories too) by its path relative to `root`: compare
    two runs' outputs without holding their bytes."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def read_run(metrics_path: str | Path) -> dict:
    """The run log written beside `metrics_path` ({} when the last run had nothing run-dependent)."""
    rp = run_path(metrics_path)
    return json.loads(rp.read_text()) if rp.is_file() else {}


def read_model_info(model_dir: str | Path) -> dict:
    """pas_model.json of a folder written by `pas.models.llm.prepare_llm` ({} when absent)."""
    path = Path(model_dir) / "pas_model.json"
    return json.loads(path.read_text()) if path.exists() else {}


def iter_test_images(d: str | Path, max_side: int = 512) -> Iterator[tuple[str, object]]:
    """(key, PIL RGB) of a test folder: webdataset shards (`*.tar`) or an ImageFolder / flat folder
    of images (key = path relative to the folder). Unreadable files are skipped with a warning."""
    for item in plan_chunks(d, chunk=1 << 62):
        yield from load_chunk(item, max_side)


def chunk_size(item: tuple) -> int:
    """Images in a `pas.data.chunks.plan_chunks` item."""
    return sum(stop - start for _, start, stop in item[1]) if item[0] == "shards" else len(item[2])


def ood_scores_dense(f: np.ndarray, g_yes: np.ndarray, g_no: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """Reference for `pas.curate.ood.ood_scores`: the formula written out on the full (N, C) matrices
    (float64)."""
    f, g_yes, g_no = (np.asarray(a, np.float64) for a in (f, g_yes, g_no))
    ly, ln = scale * f @ g_yes.T, scale * f @ g_no.T
    p = np.exp(ly - ly.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)                               # p_c
    p_no = np.exp(ln) / (np.exp(ly) + np.exp(ln))                   # softmax([yes, no])[1]
    return 1.0 - ((1.0 - p_no) * p).sum(axis=1)


def brute_force_ranks(scores: np.ndarray) -> np.ndarray:
    """Reference for `pas.curate.pareto.worst_first_ranks`: the O(N² · F) peel, repeatedly removing
    the rows no remaining row is worse than; any number of objectives."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 2 or not np.isfinite(a).all():
        raise ValueError("scores must be a finite 2-D array")
    n = a.shape[0]
    ranks = np.full(n, -1, np.int64)
    remaining = np.arange(n)
    front = 0
    while remaining.size:
        r = a[remaining]
        ge = (r[:, None, :] >= r[None, :, :]).all(axis=2)   # (M, M): row q >= row p everywhere
        gt = (r[:, None, :] > r[None, :, :]).any(axis=2)
        dominated = (ge & gt).any(axis=0)                    # p has some q worse than it
        ranks[remaining[~dominated]] = front
        remaining = remaining[dominated]
        front += 1
    return ranks
