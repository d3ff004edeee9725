"""Per-work-item results kept across (killed) runs, outside DVC's outs.

DVC deletes a stage's outs before it reruns the stage, so progress that must survive a crash lives in
a scratch folder DVC never touches (`data/.cache/<stage>/`, git-ignored), as `generate` does. A
`ChunkCache` stores one `.npz` per finished work item, named by a hash of (run fingerprint, item
identity): a rerun with the same model, params and input files finds it; any change misses it and the
item is recomputed. Files are written to a temp name and renamed, so a killed run leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def file_identity(path: str | Path) -> list:
    """What identifies an input file's content cheaply: path, size and modification time (a rerun of
    the upstream stage rewrites the file, so its mtime changes)."""
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


class ChunkCache:
    """`get(item_id)` / `put(item_id, keys, array)` for (list of str, ndarray) results."""

    def __init__(self, root: str | Path, run_fingerprint: str):
        self.root = Path(root)
        self.run_fingerprint = run_fingerprint
        self.used: set[str] = set()

    def _path(self, item_id: Any) -> Path:
        blob = json.dumps([self.run_fingerprint, item_id], sort_keys=True, default=str)
        return self.root / f"{hashlib.sha256(blob.encode()).hexdigest()[:40]}.npz"

    def get(self, item_id: Any) -> tuple[list[str], np.ndarray] | None:
        path = self._path(item_id)
        self.used.add(path.name)
        try:
            with np.load(path, allow_pickle=False) as z:
                return [str(k) for k in z["keys"]], z["x"]
        except (OSError, KeyError, ValueError):
            return None

    def put(self, item_id: Any, keys: list[str], x: np.ndarray) -> None:
        path = self._path(item_id)
        self.used.add(path.name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.stem}.npz")
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.asarray(keys, dtype=str), x=x)
        os.replace(tmp, path)

    def prune(self) -> int:
        """Delete the files of items this run did not ask for (older runs); returns how many."""
        n = 0
        for p in self.root.glob("*.npz"):
            if p.name not in self.used:
                p.unlink(missing_ok=True)
                n += 1
        return n
