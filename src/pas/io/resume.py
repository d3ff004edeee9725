"""Per-work-item results kept across (killed) runs, outside DVC's outs.

DVC deletes a stage's outs before it reruns the stage, so progress that must survive a crash lives in
a scratch folder DVC never touches (`data/.cache/<stage>/`, git-ignored). `WorkStore` is the one store
of shard-parallel work (pool chunks, dedup and leakage descriptors, ood scores, generated shards,
knn-service query batches): one payload per finished item and beside it its stats JSON, which is the
done marker, both named by a hash of (run fingerprint, item identity). The identity is the content
hash of what the item reads (`chunk_identity`, `file_identity`), so a rerun with the same model,
params and input bytes finds it and any change misses it. Payload and marker are written to temp
names and renamed, the marker last, so a killed run leaves no half item; one that cannot be read back
all the same (a disk full, a copy cut short) is a miss with a warning. A `RecordStore` keeps small
JSON records by key, many per file (`captions`: one L4 answer per request, `pas.llm.cache`).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pas.hashing import sha256_bytes, sha256_file, sha256_json
from pas.jsonio import write_atomic, write_json

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


class WorkStore:
    """The one resume store of shard-parallel work (`pas.engine.map_resumable`): per finished item a
    payload `<stem><ext>` and then its stats `<stem>.json`, the done marker (img2dataset's
    `{shard}_stats.json`: {"stats", "size", "sha256"} of the payload). `<stem>` hashes (run fingerprint,
    item identity), so other params, models or input bytes miss. `get(item_id)` → the result or None
    (unfinished, torn: warned); `put(item_id, result)`. The codec says how a result is kept: `Arrays`,
    `KeyedArray`, `Table`, `WrittenFile` (the work wrote the payload at `path(item_id)` itself)."""

    def __init__(self, root: str | Path, run_fingerprint: str, codec: Any = None):
        self.root = Path(root)
        self.run_fingerprint = run_fingerprint
        self.codec = KeyedArray() if codec is None else codec
        self.used: set[str] = set()
        self.n_resumed = 0

    def stem(self, item_id: Any) -> str:
        stem = sha256_json([self.run_fingerprint, item_id], ensure_ascii=True, default=str)[:40]
        self.used.add(stem)
        return stem

    def path(self, item_id: Any) -> Path:
        """Where item `item_id`'s payload goes."""
        return self.root / f"{self.stem(item_id)}{self.codec.ext}"

    def _marker(self, item_id: Any) -> dict | None:
        path = self.path(item_id)
        m = read_json(path.with_suffix(".json"))
        if m is None:
            return None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if not isinstance(m, dict) or "stats" not in m or size != m.get("size"):
            log.warning("ignoring resume files %s (marker and payload do not match); recomputing", path)
            return None
        return m

    def has(self, item_id: Any) -> bool:
        """Item `item_id` is marked done (its payload may still turn out damaged: `get` says so)."""
        return self._marker(item_id) is not None

    def get(self, item_id: Any) -> Any | None:
        m = self._marker(item_id)
        if m is None:
            return None
        path = self.path(item_id)
        try:
            if sha256_file(path) != m.get("sha256"):
                raise ValueError("sha256 differs from its marker's")
            result = self.codec.read(path, m["stats"])
        # a damaged or foreign payload (a truncated zip, a short array, a missing column): a miss
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable resume file %s (%s: %s); recomputing", path, type(e).__name__, e)
            return None
        self.n_resumed += 1
        return result

    def put(self, item_id: Any, result: Any) -> None:
        path = self.path(item_id)
        self.root.mkdir(parents=True, exist_ok=True)
        stats = self.codec.write(path, result)
        # the marker last: a kill before it leaves a payload that is not done
        write_json(path.with_suffix(".json"), {"stats": stats, "size": path.stat().st_size,
                                               "sha256": sha256_file(path)}, indent=None, atomic=True)

    def prune(self) -> int:
        """Delete the files of items this run did not ask for (older runs, other inputs); returns how
        many items."""
        stale = {p.name.split(".")[0] for p in self.root.glob("*") if p.is_file()} - self.used
        for p in self.root.glob("*"):
            if p.is_file() and p.name.split(".")[0] in stale:
                p.unlink(missing_ok=True)
        return len(stale)


def _replaced(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp over `path`: a killed run leaves no half payload."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


class Arrays:
    """Codec: a dict of named arrays in one `.npz`; a file lacking one of `names` is a miss."""

    ext = ".npz"

    def __init__(self, names: tuple[str, ...] = ()):
        self.names = tuple(names)

    def write(self, path: Path, arrays: dict[str, np.ndarray]) -> dict:
        _replaced(path, lambda tmp: np.savez(tmp, **arrays))   # tmp ends in .npz: savez adds none
        return {"arrays": sorted(arrays)}

    def read(self, path: Path, stats: dict) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}       # read all here: a torn member fails now, not later
        missing = [k for k in self.names if k not in out]
        if missing:
            raise KeyError(missing[0])
        return out


class KeyedArray(Arrays):
    """Codec: (list of str keys, ndarray) as an `.npz` (descriptor chunks)."""

    def __init__(self):
        super().__init__(("keys", "x"))

    def write(self, path: Path, result: tuple[list[str], np.ndarray]) -> dict:
        keys, x = result
        super().write(path, {"keys": np.asarray(keys, dtype=str), "x": x})
        return {"n": len(keys)}

    def read(self, path: Path, stats: dict) -> tuple[list[str], np.ndarray]:
        z = super().read(path, stats)
        return [str(k) for k in z["keys"]], z["x"]


class Table:
    """Codec: a DataFrame (or, with `arrow`, a pyarrow Table) as parquet, in its row order."""

    ext = ".parquet"

    def __init__(self, arrow: bool = False):
        self.arrow = arrow

    def write(self, path: Path, table) -> dict:
        import pyarrow.parquet as pq

        from pas.io.manifest import write_parquet

        if self.arrow:
            _replaced(path, lambda tmp: pq.write_table(table, tmp))
            return {"n": table.num_rows}
        _replaced(path, lambda tmp: write_parquet(table, tmp, sort_by=None))
        return {"n": len(table)}

    def read(self, path: Path, stats: dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as e:          # pyarrow's errors for a damaged file
            raise ValueError(str(e)) from None
        if table.num_rows != stats.get("n"):
            raise ValueError(f"{table.num_rows} rows, its marker says {stats.get('n')}")
        return table if self.arrow else table.to_pandas()


class WrittenFile:
    """Codec for work that writes its payload itself at `WorkStore.path(item_id)` (written to a temp
    name and renamed, on whichever node runs it) and returns its stats (a JSON object)."""

    def __init__(self, ext: str):
        self.ext = ext

    def write(self, path: Path, stats: dict) -> dict:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the work returned without writing its payload")
        return dict(stats)

    def read(self, path: Path, stats: dict) -> dict:
        return dict(stats)


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
