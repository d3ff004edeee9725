"""Export of the final dataset: the kept images of a prune selection as webdataset shards (paper §3.3).

Issue 15's split (as DataComp picks ids, then reshards): `pas.curate.prune.select` decides which
images stay from their scores alone (fronts, stop); `export_dataset` then writes the images of those
ids — the only image bytes written after retrieve/generate — in key order, with the final sample
schema (`SAMPLE_FIELDS`) and data/dataset/index.parquet. It runs in three steps:
- `_Plan` (from the selection table): the scored keys sorted, each one's front, kept flag and the
  score values its JSON carries, as numpy arrays; no image is read;
- `_read_kept`: one pass over the image shards; kept samples (less the takedown list, matched on key
  or on the URL their JSON carries) are encoded once and buffered, each full buffer spilled as one
  key-sorted run (`_SortBuffer`);
- `_write_sorted`: the runs (or the buffer) merged by key rank into shards of ≤ `maxcount` samples,
  the index built from what is written.
"""

from __future__ import annotations

import heapq
import json
import shutil
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from pas.curate.prune import METRICS

# The one sample schema of the final dataset: every sample's JSON has exactly these keys (sorted on
# disk), null (or []) where its source has no value, so readers that infer a schema from the first
# rows (Hugging Face `datasets`, pandas) see the same fields for real and synthetic images.
# name -> Hugging Face feature type (`pas.curate.card` declares them in the dataset card).
SAMPLE_FIELDS: dict[str, str | list] = {
    "key": "string",
    "source": "string",            # real | synthetic
    "concepts": ["string"],        # real: every concept that retrieved it; synthetic: its concept
    "similarities": ["float64"],   # real: CLIP similarity per concept; synthetic: []
    "caption": "string",           # real: the source's alt text; synthetic: the L4 caption
    "url": "string",               # real images from a URL source
    "pool_key": "string",          # real images from a local pool: its key in data/pool
    "path": "string",              # real images from a local pool: the file's path in the pool
    "license": "string",           # where the source states one
    "seed": "int64",               # synthetic: the diffusion seed
    "caption_idx": "int64",        # synthetic: which of the concept's captions
    "image_idx": "int64",          # synthetic: which image of that caption
    "fallback_caption": "bool",    # synthetic: the caption is the template (L4 gave none)
    "ood_b": "float64",
    "ood_bprime": "float64",
    "ood_blur_delta": "float64",
    "text_boxes": "int64",
    "pareto_front": "int64",
}


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


def _concepts(meta: dict) -> list[str]:
    if isinstance(meta.get("concepts"), list):
        return [str(c) for c in meta["concepts"]]
    return [str(meta["concept"])] if meta.get("concept") else []


# provenance columns of data/dataset/index.parquet (the scores and the front follow)
INDEX_FIELDS = ("key", "source", "concepts", "caption", "url", "pool_key", "path", "license")


def dataset_sample(meta: dict, scores: dict, front: int) -> dict:
    """A sample's JSON in the final dataset: `SAMPLE_FIELDS` exactly (null / [] where absent)."""
    full = {**meta, **scores, "pareto_front": front, "concepts": _concepts(meta),
            "similarities": [float(x) for x in meta.get("similarities") or []]}
    return {f: full.get(f, [] if isinstance(t, list) else None) for f, t in SAMPLE_FIELDS.items()}


def read_takedown(path: str | Path | None) -> frozenset[str]:
    """Keys or URLs to exclude from the dataset, one per line (`#` comments, blank lines ignored)."""
    if path is None:
        return frozenset()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such takedown list (prune.takedown)")
    return frozenset(ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()) - {""}


@dataclass
class ExportReport:
    index: pd.DataFrame                      # one row per kept image, sorted by key
    sources_in: Counter                      # every sample found in the image dirs, by source
    sources_scored: Counter                  # scored samples, by source
    sources_kept: Counter                    # kept samples, by source
    thumbs: dict                             # key -> image bytes of the requested sample keys
    n_runs: int
    n_takedown: int = 0                      # kept images not written: their key or URL is on the takedown list


class _SortBuffer:
    """Kept samples waiting for the key sort: every image and encoded JSON in one bytearray, and per
    sample (key rank, image ext, image start, JSON start) in one int64 array. `nbytes` is what it
    holds, per-sample bookkeeping included (a list of Sample objects cost far more per sample beyond the
    image: benchmarks/RESULTS-scale.md)."""

    PER_SAMPLE = 4 * 8

    def __init__(self) -> None:
        self.blob = bytearray()
        self.rec = array("q")

    def __len__(self) -> int:
        return len(self.rec) // 4

    @property
    def nbytes(self) -> int:
        return len(self.blob) + self.PER_SAMPLE * len(self)

    def add(self, rank: int, ext: int, image: bytes, meta: bytes) -> None:
        self.rec.extend((rank, ext, len(self.blob), len(self.blob) + len(image)))
        self.blob += image
        self.blob += meta

    def sorted(self) -> Iterator[tuple[int, int, bytes, bytes]]:
        """(key rank, ext, image, JSON) in key order."""
        rec = np.frombuffer(self.rec, np.int64).reshape(-1, 4)
        ends = np.append(rec[1:, 2], len(self.blob))
        view = memoryview(self.blob)
        for i in np.argsort(rec[:, 0], kind="stable").tolist():
            rank, ext, a, b = rec[i].tolist()
            yield rank, ext, bytes(view[a:b]), bytes(view[b:ends[i]])

    def spill(self, path: Path) -> None:
        """Write the samples in key order as one run: `path` (the bytes) + `path`.npy (rank, ext,
        image size, JSON size per sample)."""
        sizes = array("q")
        with open(path, "wb") as f:
            for rank, ext, image, meta in self.sorted():
                f.write(image)
                f.write(meta)
                sizes.extend((rank, ext, len(image), len(meta)))
        np.save(path.with_suffix(".npy"), np.frombuffer(sizes, np.int64).reshape(-1, 4))
        self.blob, self.rec = bytearray(), array("q")


def _read_run(path: Path) -> Iterator[tuple[int, int, bytes, bytes]]:
    sizes = np.load(path.with_suffix(".npy"))
    with open(path, "rb", buffering=1 << 20) as f:
        for row in sizes:                   # row by row: a list of the whole run is ~0.1 KB a sample
            rank, ext, n_image, n_meta = row.tolist()
            yield rank, ext, f.read(n_image), f.read(n_meta)


def _score_columns(table: pd.DataFrame, cols: Sequence[str]) -> list:
    """Per column, what `_jsonable` turns element i into: numeric columns stay arrays (their element's
    `.item()`), others become object arrays of JSON-ready values."""
    out = []
    for c in cols:
        s = table[c]
        if isinstance(s.dtype, np.dtype) and s.dtype.kind in "biuf":
            out.append(s.to_numpy())
        else:
            out.append(s.map(_jsonable).to_numpy(dtype=object))
    return out


@dataclass
class _Plan:
    """What the export needs of the selection, no images, in key order: row r is the r-th smallest
    key (its rank: the sort and the merge compare ints). Numpy arrays only, no key → row dict or str
    per scored image (their cost: benchmarks/RESULTS-scale.md)."""

    keys: np.ndarray                # sorted keys as UTF-8 bytes ('S'): bytewise order is str order
    fronts: np.ndarray
    removed: np.ndarray
    cols: list[str]                 # score columns in each sample's JSON and the index
    values: list                    # `_score_columns`

    @classmethod
    def of(cls, table: pd.DataFrame, extra_cols: Sequence[str]) -> "_Plan":
        lacking = sorted({"key", "front", "removed", *METRICS} - set(table.columns))
        if lacking:
            raise ValueError(f"result table lacks column(s) {lacking}")
        keys = np.char.encode(table["key"].to_numpy(dtype=str), "utf-8")
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if (keys[1:] == keys[:-1]).any():
            raise ValueError("result table has duplicate keys")
        cols = [c for c in (*METRICS, *extra_cols) if c in table.columns]
        return cls(keys, table["front"].to_numpy(np.int64)[order], table["removed"].to_numpy(bool)[order],
                   cols, [v[order] for v in _score_columns(table, cols)])

    def rank(self, key: str) -> int:
        """`key`'s rank (its row here), -1 if it is not scored."""
        k = key.encode()
        r = int(self.keys.searchsorted(k))
        return r if r < len(self.keys) and self.keys[r] == k else -1

    def scores(self, r: int) -> dict:
        return {c: _jsonable(v[r]) for c, v in zip(self.cols, self.values)}


@dataclass
class _Kept:
    """What `_read_kept` leaves: the sorted runs or the buffer, and how many samples they hold."""

    runs: list[Path]
    buf: _SortBuffer
    n: int = 0

    def sorted(self) -> Iterator[tuple[int, int, bytes, bytes]]:
        """(rank, ext, image, JSON) of every kept sample in key order: the runs merged, or the
        buffer sorted and then released (before the index is built)."""
        if self.runs:
            yield from heapq.merge(*(_read_run(r) for r in self.runs))
        else:
            yield from self.buf.sorted()
            self.buf = _SortBuffer()


def _read_kept(dirs: list[str], plan: _Plan, rep: ExportReport, work: Path, buffer_bytes: int,
               want_thumbs: set[str], takedown: frozenset[str], progress: bool) -> _Kept:
    """One pass over the image shards: count sources, take thumbnails, buffer the kept samples."""
    from tqdm import tqdm

    from pas.io.shards import IMAGE_EXTS, iter_samples, meta_json

    kept = _Kept([], _SortBuffer())
    found = np.zeros(len(plan.keys), bool)
    for s in tqdm(iter_samples(dirs), desc="prune: read images", unit="img", disable=not progress):
        src = str(s.meta.get("source", "unknown"))
        rep.sources_in[src] += 1
        r = plan.rank(s.key)
        if r < 0:
            continue
        if found[r]:
            raise ValueError(f"image key {s.key!r} appears twice in {dirs} (second in {s.shard})")
        found[r] = True
        rep.sources_scored[src] += 1
        if s.key in want_thumbs:
            rep.thumbs[s.key] = s.image
        if plan.removed[r]:
            continue
        if s.key in takedown or s.meta.get("url") in takedown:
            rep.n_takedown += 1
            continue
        meta = dataset_sample(s.meta, plan.scores(r), int(plan.fronts[r]))
        kept.buf.add(r, IMAGE_EXTS.index(s.ext), s.image, meta_json(s.key, meta))
        kept.n += 1
        if kept.buf.nbytes >= buffer_bytes:
            kept.runs.append(work / f"run{len(kept.runs):04d}")
            kept.buf.spill(kept.runs[-1])
    if not found.all():
        missing = [k.decode() for k in plan.keys[~found]]
        raise ValueError(f"{len(missing)} scored image(s) not found in {dirs}, e.g. {missing[:3]}")
    if kept.runs and len(kept.buf):
        kept.runs.append(work / f"run{len(kept.runs):04d}")
        kept.buf.spill(kept.runs[-1])
    return kept


# index fields whose values many samples share: kept once (`json.loads` makes a new object per sample)
SHARED_FIELDS = ("source", "concepts", "license")


def _shared(memo: dict, v):
    """`v`, or the equal value (a str or a list of str) that `memo` already holds."""
    if isinstance(v, str):
        return memo.setdefault(v, v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return memo.setdefault(tuple(v), v)
    return v


def _write_sorted(kept: _Kept, plan: _Plan, rep: ExportReport, stage: Path, maxcount: int,
                  progress: bool) -> pd.DataFrame:
    """Merge the runs (or sort the buffer) by key into `stage` shards + index.parquet; the index.
    Counts `rep.sources_kept` in key order, as written."""
    from tqdm import tqdm

    from pas.io.shards import IMAGE_EXTS, ShardWriter, write_index

    # the index fields of a kept sample are read back from its JSON: holding them from the read on
    # would keep Python objects for every kept sample beside the full buffer
    fields: dict[str, list] = {f: [] for f in INDEX_FIELDS[1:]}
    shared: dict = {}
    rows = array("q")
    with ShardWriter(stage, prefix="shard", maxcount=maxcount) as w:
        for r, ext, image, meta in tqdm(kept.sorted(), desc="prune: write dataset", unit="img", total=kept.n,
                                        disable=not progress):
            w.write_encoded(plan.keys[r].decode(), image, meta, ext=IMAGE_EXTS[ext])
            rows.append(r)
            sample = json.loads(meta)
            for f, col in fields.items():
                col.append(_shared(shared, sample[f]) if f in SHARED_FIELDS else sample[f])
    rows = np.frombuffer(rows, np.int64) if len(rows) else np.zeros(0, np.int64)
    head = w.index_frame()
    data = {"key": head.get("key"), "shard": head.get("shard"), **fields,
            **{c: [_jsonable(v[i]) for i in rows.tolist()] for c, v in zip(plan.cols, plan.values)},
            "front": plan.fronts[rows].tolist()}
    rep.sources_kept.update(str(x) for x in fields["source"])
    index = pd.DataFrame(data if len(rows) else [], columns=["key", "shard", *INDEX_FIELDS[1:], *plan.cols, "front"])
    # the frame holds its own str columns (arrow-backed): the parsed values go before the object
    # columns below make theirs
    data = fields = shared = head = None
    for c in ("caption", "url", "pool_key", "path", "license"):
        index[c] = index[c].astype(object)
    write_index(index, stage)
    return index


def export_dataset(image_dirs: Sequence[str | Path], result_table: pd.DataFrame, out_dir: str | Path,
                   *, maxcount: int = 10_000, buffer_bytes: int = 1 << 30,
                   sample_keys: Iterable[str] = (), extra_cols: Sequence[str] = ("text_boxes",),
                   takedown: Iterable[str] = (), progress: bool = True) -> ExportReport:
    """Write the kept images of `result_table` (key, scores, front, removed) to `out_dir` shards.

    Images are streamed once from `image_dirs` (`pas.io.shards.iter_samples`); kept samples are
    buffered up to `buffer_bytes` (images, encoded JSON and 32 bytes of bookkeeping each: `_SortBuffer`),
    each full buffer spilled as one key-sorted run, and the runs merged by key into `out_dir`
    (≤ `maxcount` per shard), so memory stays bounded at any dataset size beyond a few numbers per
    scored image and the index of the kept ones.
    Each sample's JSON follows `SAMPLE_FIELDS` (`dataset_sample`): its provenance from retrieve /
    generate, the three scores (+ `extra_cols`) and `pareto_front`. Kept images whose key or URL is
    in `takedown` are left out (`ExportReport.n_takedown`).
    `out_dir` is replaced only after everything is written. Raises ValueError if a scored key is not
    in the image dirs or a key appears twice.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    plan = _Plan.of(result_table, extra_cols)
    rep = ExportReport(pd.DataFrame(), Counter(), Counter(), Counter(), {}, 0)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        kept = _read_kept([str(d) for d in image_dirs], plan, rep, work, buffer_bytes, set(sample_keys),
                          frozenset(takedown), progress)
        rep.n_runs = len(kept.runs)
        stage = work / "out"
        rep.index = _write_sorted(kept, plan, rep, stage, maxcount, progress)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rep
