"""Pareto-front pruning of the OOD-scored images and export of the final dataset (paper §3.3).

Paper: "an image I is considered less suitable than the image J (and therefore prioritized for
removal) if it shows higher OOD scores across the metrics"; kneedle on the per-front mean of each
metric against the cumulative number removed gives three knees and "by selecting the maximum X value
among the three knees (one per metric), we can estimate the most efficient halt point"; "the Pareto
optimization process also provides a structured guidance for filtering the dataset down to any
desired size".

`select` is the pure selection (scores in, front rank + removed flag + summary out); `export_dataset`
writes the kept images as webdataset shards in key order (the only image bytes written after
retrieve/generate); `dataset_funnel` assembles the per-stage dataset sizes for metrics/dataset.json.
Stop modes (`PruneParams.stop`):
- "knee" (paper): remove whole worst fronts up to the max x of the three kneedle knees
  (`pas.curate.knee`); no knee on any metric -> nothing removed, reason "no_knee".
- "target_size": remove whole worst fronts while more than `target_size` images remain, then break
  the last front deterministically: its images with the highest sum of the three scores go first,
  ties by key; exactly `target_size` images are kept.
- "max_fronts": remove the `max_fronts` worst fronts.
`max_fronts`, when set, also caps the other two modes (reason "max_fronts" when it binds).
"""

from __future__ import annotations

import heapq
import json
import logging
import shutil
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from pas.params import ParamsError, check_choice, check_range, check_seed

log = logging.getLogger(__name__)

METRICS = ("ood_b", "ood_bprime", "ood_blur_delta")
STOPS = ("knee", "target_size", "max_fronts")

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


@dataclass(frozen=True)
class PruneParams:
    """params.yaml section `prune`."""

    stop: str = "knee"                  # knee (paper) | target_size | max_fronts
    target_size: int | None = None      # images kept when stop = target_size
    max_fronts: int | None = None       # worst fronts removed when stop = max_fronts; a cap otherwise
    knee_bins: int = 0                  # 0 = the paper's per-front curve; else equal-image-count bins
    knee_interp: str = "interp1d"       # kneed interp_method: interp1d | polynomial
    knee_poly_degree: int = 7           # polynomial degree when knee_interp = polynomial
    knee_sensitivity: float = 1.0       # kneedle's S (higher = more conservative knees)
    shard_maxcount: int = 10_000        # images per output shard (contract: <= 10k)
    sort_buffer_mb: int = 1024          # kept image bytes held in RAM before spilling a sorted run
    sample_fronts: tuple[int, ...] = (1, 10, 100)  # "Pareto n" rows of the sample grid (1 = removed first)
    sample_per_front: int = 8           # images per row of the sample grid
    seed: int = 0                       # top-level seed: which images the sample grid shows
    takedown: str | None = None         # file of keys / URLs left out of the dataset (read_takedown)
    license: str = "other"              # the dataset card's licence (a Hugging Face licence id)

    def __post_init__(self) -> None:
        check_choice("stop", self.stop, STOPS)
        check_seed("seed", self.seed)
        if self.stop == "target_size" and self.target_size is None:
            raise ParamsError("target_size: required when stop=target_size")
        if self.stop == "max_fronts" and self.max_fronts is None:
            raise ParamsError("max_fronts: required when stop=max_fronts")
        if self.target_size is not None:
            check_range("target_size", self.target_size, 0, None, lo_open=False)
        if self.max_fronts is not None:
            check_range("max_fronts", self.max_fronts, 0, None, lo_open=False)
        if self.knee_bins != 0:
            check_range("knee_bins", self.knee_bins, 3, None, lo_open=False)
        check_choice("knee_interp", self.knee_interp, ("interp1d", "polynomial"))
        if not isinstance(self.license, str) or not self.license.strip():
            raise ParamsError(f"license={self.license!r}: expected a licence id such as cc0-1.0 or other")
        check_range("knee_poly_degree", self.knee_poly_degree, 1, 20, lo_open=False, hi_open=False)
        check_range("knee_sensitivity", self.knee_sensitivity, 0.0, None)
        check_range("shard_maxcount", self.shard_maxcount, 1, 10_000, lo_open=False, hi_open=False)
        check_range("sort_buffer_mb", self.sort_buffer_mb, 1, None, lo_open=False)
        for n in self.sample_fronts:
            check_range("sample_fronts[]", n, 1, None, lo_open=False)
        check_range("sample_per_front", self.sample_per_front, 0, 64, lo_open=False, hi_open=False)


@dataclass
class PruneResult:
    table: pd.DataFrame      # input columns + front (0 = removed first) + removed, sorted by key
    curve: pd.DataFrame      # per front: front, n, removed (cumulative), mean of each metric
    binned: pd.DataFrame     # the curve kneedle saw: bin, removed, mean of each metric
    knees: dict              # metric -> pas.curate.knee.Knee (empty unless stop = knee)
    summary: dict = field(default_factory=dict)


def check_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Validate a scores table and return it sorted by key (clear errors naming keys)."""
    missing = [c for c in ("key", *METRICS) if c not in df.columns]
    if missing:
        raise ValueError(f"scores table lacks column(s) {missing} (has {list(df.columns)})")
    dup = df["key"][df["key"].duplicated()]
    if len(dup):
        raise ValueError(f"scores table has {len(dup)} duplicate key(s), e.g. {dup.iloc[0]!r}")
    vals = df[list(METRICS)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(vals).all(axis=1)
    if bad.any():
        keys = df["key"][bad].tolist()
        raise ValueError(f"{len(keys)} image(s) have NaN/inf OOD scores, e.g. {keys[:3]}")
    return df.sort_values("key", kind="stable").reset_index(drop=True)


def _break_front(table: pd.DataFrame, idx: np.ndarray, k: int) -> np.ndarray:
    """The `k` images of front rows `idx` removed first: highest score sum, ties by key."""
    sub = table.iloc[idx]
    order = np.lexsort((sub["key"].to_numpy(), -sub[list(METRICS)].to_numpy().sum(axis=1)))
    return idx[order[:k]]


def select(scores: pd.DataFrame, p: PruneParams) -> PruneResult:
    """Rank the images into worst-first fronts and choose which to remove (see module docstring)."""
    from pas.curate.knee import bin_curve, front_curve, knee_stop
    from pas.curate.pareto import worst_first_ranks

    table = check_scores(scores)
    N = len(table)
    vals = table[list(METRICS)].to_numpy(dtype=np.float64)
    ranks = worst_first_ranks(vals)
    n, x, Y = front_curve(ranks, vals)
    F = len(n)
    curve = pd.DataFrame({"front": np.arange(F), "n": n, "removed": x,
                          **{m: Y[:, i] for i, m in enumerate(METRICS)}})
    xb, Yb = bin_curve(n, x, Y, p.knee_bins) if F else (x, Y)
    binned = pd.DataFrame({"bin": np.arange(len(xb)), "removed": xb,
                           **{m: Yb[:, i] for i, m in enumerate(METRICS)}})

    knees: dict = {}
    fronts, reason = 0, "empty"
    if N and p.stop == "knee":
        res = knee_stop(n, x, Y, METRICS, bins=p.knee_bins, S=p.knee_sensitivity,
                        interp=p.knee_interp, degree=p.knee_poly_degree)
        knees, fronts, reason = res["knees"], res["fronts"], res["reason"]
    elif N and p.stop == "max_fronts":
        fronts, reason = min(p.max_fronts, F), "max_fronts"
    elif N and p.stop == "target_size":
        fronts, reason = 0, "already_small"
        if p.target_size < N:               # fronts < j go whole; front j (first with x_j >= N - T) splits
            j = int(np.searchsorted(x, N - p.target_size, side="left"))
            fronts, reason = j, "target_size"

    removed = ranks < fronts
    partial = None
    if N and p.stop == "target_size" and p.target_size < N:
        extra = N - int(removed.sum()) - p.target_size        # still to remove, all from front j
        if extra == n[fronts]:
            fronts += 1
            removed = ranks < fronts
        elif extra > 0:
            partial = fronts
            removed[_break_front(table, np.flatnonzero(ranks == partial), extra)] = True
    if p.max_fronts is not None and p.stop != "max_fronts" and N:
        touched = fronts + (partial is not None)
        if touched > p.max_fronts:
            removed = ranks < p.max_fronts
            fronts, partial, reason = p.max_fronts, None, "max_fronts"

    table = table.assign(front=ranks, removed=removed)
    n_removed = int(removed.sum())
    summary = {
        "n_in": N, "n_kept": N - n_removed, "n_removed": n_removed,
        "fronts": F, "fronts_removed": fronts, "partial_front": partial,
        "stop": p.stop, "stop_reason": reason, "stop_x": n_removed,
        "knee_x": {m: k.x for m, k in knees.items() if k.x is not None},
        "knee_reason": {m: k.reason for m, k in knees.items()},
        "knee_bins": p.knee_bins, "knee_interp": p.knee_interp,
    }
    return PruneResult(table=table, curve=curve, binned=binned, knees=knees, summary=summary)


# ----------------------------------------------------------------------------------------------
# export


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
    holds, per-sample bookkeeping included (a list of Sample objects held ~1.4 KB of Python objects
    per sample beyond the image, benchmarks/RESULTS-scale.md)."""

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
        sizes = []
        with open(path, "wb") as f:
            for rank, ext, image, meta in self.sorted():
                f.write(image)
                f.write(meta)
                sizes.append((rank, ext, len(image), len(meta)))
        np.save(path.with_suffix(".npy"), np.array(sizes, np.int64).reshape(-1, 4))
        self.blob, self.rec = bytearray(), array("q")


def _read_run(path: Path) -> Iterator[tuple[int, int, bytes, bytes]]:
    sizes = np.load(path.with_suffix(".npy"))
    with open(path, "rb", buffering=1 << 20) as f:
        for rank, ext, n_image, n_meta in sizes.tolist():
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
    from tqdm import tqdm

    from pas.io.shards import IMAGE_EXTS, ShardWriter, iter_samples, meta_json, write_index

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lacking = sorted({"key", "front", "removed", *METRICS} - set(result_table.columns))
    if lacking:
        raise ValueError(f"result table lacks column(s) {lacking}")
    cols = [c for c in (*METRICS, *extra_cols) if c in result_table.columns]
    keys = result_table["key"].tolist()
    row_of = {k: i for i, k in enumerate(keys)}     # plain dict: pandas .loc per image is slow at 1M
    if len(row_of) != len(keys):
        raise ValueError("result table has duplicate keys")
    # key rank of each row: the merge and the buffer sort compare small ints, not strings
    rank = np.empty(len(keys), np.int64)
    rank[np.argsort(np.array(keys, dtype=object), kind="stable")] = np.arange(len(keys))
    fronts = result_table["front"].to_numpy(np.int64)
    removed = result_table["removed"].to_numpy(bool)
    values = _score_columns(result_table, cols)
    found = np.zeros(len(keys), bool)
    n_keep = int((~removed).sum())
    want_thumbs = set(sample_keys)
    rep = ExportReport(pd.DataFrame(), Counter(), Counter(), Counter(), {}, 0)
    takedown = frozenset(takedown)
    # index columns of the kept samples, in read order (sorted by key rank at the end)
    kept_rows = array("q")
    fields: dict[str, list] = {f: [] for f in INDEX_FIELDS[1:]}

    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        runs: list[Path] = []
        buf = _SortBuffer()
        dirs = [str(d) for d in image_dirs]
        for s in tqdm(iter_samples(dirs), desc="prune: read images", unit="img", disable=not progress):
            src = str(s.meta.get("source", "unknown"))
            rep.sources_in[src] += 1
            i = row_of.get(s.key)
            if i is None:
                continue
            if found[i]:
                raise ValueError(f"image key {s.key!r} appears twice in {dirs} (second in {s.shard})")
            found[i] = True
            rep.sources_scored[src] += 1
            if s.key in want_thumbs:
                rep.thumbs[s.key] = s.image
            if removed[i]:
                continue
            if s.key in takedown or s.meta.get("url") in takedown:
                rep.n_takedown += 1
                continue
            meta = dataset_sample(s.meta, {c: _jsonable(v[i]) for c, v in zip(cols, values)}, int(fronts[i]))
            kept_rows.append(i)
            for f, col in fields.items():
                col.append(meta[f])
            buf.add(int(rank[i]), IMAGE_EXTS.index(s.ext), s.image, meta_json(s.key, meta))
            if buf.nbytes >= buffer_bytes:
                runs.append(work / f"run{len(runs):04d}")
                buf.spill(runs[-1])
        if not found.all():
            missing = sorted(k for k, f in zip(keys, found) if not f)
            raise ValueError(f"{len(missing)} scored image(s) not found in {dirs}, e.g. {missing[:3]}")
        if runs and len(buf):
            runs.append(work / f"run{len(runs):04d}")
            buf.spill(runs[-1])
        rep.n_runs = len(runs)
        stream = heapq.merge(*(_read_run(r) for r in runs)) if runs else buf.sorted()

        stage = work / "out"
        row_by_rank = np.empty(len(keys), np.int64)
        row_by_rank[rank] = np.arange(len(keys))
        shard_of = array("q")
        with ShardWriter(stage, prefix="shard", maxcount=maxcount) as w:
            for r, ext, image, meta in tqdm(stream, desc="prune: write dataset", unit="img",
                                            total=n_keep - rep.n_takedown, disable=not progress):
                w.write_encoded(keys[row_by_rank[r]], image, meta, ext=IMAGE_EXTS[ext])
                shard_of.append(len(w.shards) - 1)
        del buf
        # written in key order: the index rows follow the kept rows sorted by key rank
        order = np.argsort(rank[np.frombuffer(kept_rows, np.int64)], kind="stable") if len(kept_rows) \
            else np.zeros(0, np.int64)
        rows = np.frombuffer(kept_rows, np.int64)[order]
        data = {"key": [keys[i] for i in rows.tolist()], "shard": [w.shards[j] for j in shard_of],
                **{f: [fields[f][j] for j in order.tolist()] for f in INDEX_FIELDS[1:]},
                **{c: [_jsonable(v[i]) for i in rows.tolist()] for c, v in zip(cols, values)},
                "front": fronts[rows].tolist()}
        del fields
        rep.sources_kept.update(str(x) for x in data["source"])     # counted in key order, as written
        index = pd.DataFrame(data if len(rows) else [], columns=["key", "shard", *INDEX_FIELDS[1:], *cols, "front"])
        for c in ("caption", "url", "pool_key", "path", "license"):
            index[c] = index[c].astype(object)
        write_index(index, stage)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
        rep.index = index
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rep


# ----------------------------------------------------------------------------------------------
# sample grid choice and dataset funnel


def sample_grid_keys(table: pd.DataFrame, fronts_1based: Sequence[int], per_front: int,
                     seed: int) -> dict[int, list[str]]:
    """Keys shown for "Pareto n" (front n - 1), n in `fronts_1based` that exist: a seeded choice."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in fronts_1based:
        keys = sorted(table.loc[table["front"] == n - 1, "key"])
        if keys:
            pick = rng.choice(len(keys), size=min(per_front, len(keys)), replace=False)
            out[n] = [keys[i] for i in sorted(pick)]
    return out


# keys read from the other stages' metrics files (the lead aligns those stages to them)
FUNNEL_METRICS = {
    "retrieve": ("retrieve.json", "n_unique"),
    "generate": ("generate.json", "n_images"),
    "dedup": ("dedup.json", "n_kept"),
    "leakage": ("leakage.json", "n_kept"),
}


def _read_metrics(metrics_dir: Path | None, name: str) -> dict:
    if metrics_dir is None:
        return {}
    path = Path(metrics_dir) / name
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        log.warning("%s: not valid JSON (%s); funnel entry left out", path, e)
        return {}


def dataset_funnel(metrics_dir: str | Path | None, sources_in: Counter, sources_scored: Counter,
                   sources_kept: Counter) -> dict:
    """Dataset size after each stage, real vs synthetic where known (metrics/dataset.json).

    retrieve / generate: real / synthetic images found in the prune stage's image dirs (falling back
    to metrics/retrieve.json "n_unique" and metrics/generate.json "n_images"); dedup / leakage:
    metrics/<stage>.json "n_kept" and its "by_source" (the stats vocabulary); ood: images
    scored; prune: images kept. Stages with nothing known are left out.
    """
    md = Path(metrics_dir) if metrics_dir is not None else None
    funnel: dict = {}
    for stage, src in (("retrieve", "real"), ("generate", "synthetic")):
        m = _read_metrics(md, FUNNEL_METRICS[stage][0]).get(FUNNEL_METRICS[stage][1])
        if sources_in.get(src):
            funnel[stage] = {"n": sources_in[src], src: sources_in[src]}
            if isinstance(m, (int, float)) and m != sources_in[src]:
                log.warning("funnel: %s images on disk %d != metrics/%s %s=%s", stage,
                            sources_in[src], *FUNNEL_METRICS[stage], m)
        elif isinstance(m, (int, float)):
            funnel[stage] = {"n": int(m), src: int(m)}
    for stage in ("dedup", "leakage"):
        m = _read_metrics(md, FUNNEL_METRICS[stage][0])
        if isinstance(m.get("n_kept"), (int, float)):
            e = {"n": int(m["n_kept"])}
            for s, by in (m.get("by_source") or {}).items():
                if s in ("real", "synthetic") and isinstance(by.get("n_kept"), (int, float)):
                    e[s] = int(by["n_kept"])
            funnel[stage] = e
    for stage, c in (("ood", sources_scored), ("prune", sources_kept)):
        funnel[stage] = {"n": int(sum(c.values())), "real": int(c.get("real", 0)),
                         "synthetic": int(c.get("synthetic", 0))}
    kept = funnel["prune"]
    funnel["final"] = {"n": kept["n"], "real": kept["real"], "synthetic": kept["synthetic"],
                       "real_fraction": kept["real"] / kept["n"] if kept["n"] else None}
    return funnel
