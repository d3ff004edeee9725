"""Per-work-item results kept across (killed) runs, outside DVC's outs.

DVC deletes a stage's outs before it reruns the stage, so progress that must survive a crash lives in
a scratch folder DVC never touches (`data/.cache/<stage>/`, git-ignored), as `generate` does. A
`ChunkCache` stores one `.npz` per finished work item, named by a hash of (run fingerprint, item
identity): a rerun with the same model, params and input bytes finds it; any change misses it and the
item is recomputed. Files are written to a temp name and renamed, so a killed run leaves no half file;
one that cannot be read back all the same (a disk full, a copy cut short) is a miss with a warning.
`get_arrays`/`put_arrays` keep several named arrays per item (`pool`: a chunk's records, JPEG bytes
and CLIP embeddings). A `RecordStore` keeps small JSON records by key the same way, many per file (`captions`: one L4
answer per request, `pas.llm.cache`).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pas.hashing import sha256_bytes, sha256_json
from pas.jsonio import write_atomic

log = logging.getLogger(__name__)


def file_identity(path: str | Path) -> list:
    """What identifies an input file: the sha256 of its bytes (hashed once per process; shard readers
    hash it anyway to check it against its index). Not its path or mtime: `dvc checkout` or an
    upstream rerun that rewrites the same bytes must not force a recompute."""
    from pas.io.shards import shard_sha256

    return ["sha256", shard_sha256(path)]


def chunk_identity(item: tuple) -> list:
    """What a `pas.data.chunks` item reads, by content: each shard span as [identity of the shard, start,
    stop], each file as [relative path, identity of the file]. The one input-identity rule of resumable
    work (`pas.engine.map_resumable`, the pool's chunks): `dvc checkout` rewriting the same bytes still
    hits. A file that cannot be read gets an error id (decoding reports it; readable later, another id)."""
    def ident(path) -> list:
        try:
            return file_identity(path)
        except OSError as e:
            return ["error", type(e).__name__]

    if item[0] == "shards":
        return [[ident(shard), start, stop] for shard, start, stop in item[1]]
    _, d, files = item
    return [[rel, ident(Path(d) / rel)] for rel in files]


def read_json(path: str | Path) -> Any | None:
    """A resume file's JSON, or None when it is missing or unreadable (a torn write: warned, treated
    as a miss so the item is recomputed)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("ignoring unreadable resume file %s (%s); recomputing", path, e)
        return None


class ChunkCache:
    """`get(item_id)` / `put(item_id, (keys, array))` for (list of str, ndarray) results, the store of
    `pas.engine.map_resumable`; `get_arrays` / `put_arrays` for a result of several named arrays
    (`pool`: records, JPEGs, embeddings)."""

    def __init__(self, root: str | Path, run_fingerprint: str):
        self.root = Path(root)
        self.run_fingerprint = run_fingerprint
        self.used: set[str] = set()

    def _path(self, item_id: Any) -> Path:
        return self.root / f"{sha256_json([self.run_fingerprint, item_id], ensure_ascii=True, default=str)[:40]}.npz"

    def has(self, item_id: Any) -> bool:
        """A file is stored for `item_id` (it may still turn out torn: `get` says so)."""
        path = self._path(item_id)
        self.used.add(path.name)
        return path.is_file()

    def get_arrays(self, item_id: Any, names: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
        """The arrays stored for `item_id`, or None: missing, torn, or lacking one of `names`."""
        path = self._path(item_id)
        self.used.add(path.name)
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}   # read all here: a torn member fails now, not later
            missing = [k for k in names if k not in out]
            if missing:
                raise KeyError(missing[0])
            return out
        except FileNotFoundError:
            return None
        # a torn or foreign file (a truncated zip, a short array): a miss, recomputed and overwritten
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable cache file %s (%s: %s); recomputing", path, type(e).__name__, e)
            return None

    def put_arrays(self, item_id: Any, **arrays: np.ndarray) -> None:
        path = self._path(item_id)
        self.used.add(path.name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.stem}.npz")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    def get(self, item_id: Any) -> tuple[list[str], np.ndarray] | None:
        z = self.get_arrays(item_id, ("keys", "x"))
        return None if z is None else ([str(k) for k in z["keys"]], z["x"])

    def put(self, item_id: Any, result: tuple[list[str], np.ndarray]) -> None:
        keys, x = result
        self.put_arrays(item_id, keys=np.asarray(keys, dtype=str), x=x)

    def prune(self) -> int:
        """Delete the files of items this run did not ask for (older runs); returns how many."""
        n = 0
        for p in self.root.glob("*.npz"):
            if p.name not in self.used:
                p.unlink(missing_ok=True)
                n += 1
        return n


class RecordStore:
    """JSON records by key (str → JSON value), kept across (killed) runs: `get(key)`, `add({key: record})`
    (one new file per call, written atomically and named by its content, so a killed run loses at most
    the call in flight), `compact()` (one file of the records this run asked for, the others deleted)."""

    PATTERN = "records-*.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.records: dict[str, Any] = {}
        self.used: set[str] = set()
        for p in sorted(self.root.glob(self.PATTERN)):
            data = read_json(p)
            if isinstance(data, dict):
                self.records.update(data)
            elif data is not None:
                log.warning("ignoring resume file %s: not a JSON object", p)

    def get(self, key: str) -> Any | None:
        self.used.add(key)
        return self.records.get(key)

    def _write(self, records: dict[str, Any]) -> Path:
        blob = json.dumps(records, sort_keys=True, ensure_ascii=False)
        path = self.root / f"records-{sha256_bytes(blob)[:20]}.json"
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(path, blob.encode("utf-8", "surrogatepass"))
        return path

    def add(self, records: dict[str, Any]) -> None:
        if not records:
            return
        self.used.update(records)
        self.records.update(records)
        self._write(records)

    def compact(self) -> int:
        """Keep only the records asked for or added since this store was opened; returns how many
        were dropped."""
        keep = {k: self.records[k] for k in sorted(self.used) if k in self.records}
        old = set(self.root.glob(self.PATTERN))
        new = self._write(keep) if keep else None
        for p in old - {new}:
            p.unlink(missing_ok=True)
        dropped = len(self.records) - len(keep)
        self.records = keep
        return dropped
