"""Parquet manifests and JSON metrics, written reproducibly (sorted rows, sorted keys).

Tracked metrics hold results only, so `dvc metrics diff` after a rerun with identical inputs is empty:
what differs between two such runs (wall times, throughput, fingerprints, resume and cache counters)
goes to the stage's run log `<metrics stem>.run.json` beside it, git-ignored and not a DVC out.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger("pas.metrics")

# snake_case words that mark a key as run-dependent: `seconds_per_image`, `images_per_second`,
# `fingerprint`, `n_shards_resumed`, `resumed_from_epoch`, `captions_cached`, `n_timed`
RUN_WORDS = frozenset({"seconds", "second", "fingerprint", "resumed", "cached", "timed"})

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pas.jsonio import write_json


def write_parquet(df: pd.DataFrame, path: str | Path, sort_by: str | None = "key") -> Path:
    """Write `df` sorted by `sort_by` (stable) without the pandas index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a stable sort leaves sorted rows as they are: no sorted copy of a frame already in order
    if sort_by is not None and sort_by in df.columns and len(df) and not _in_order(df[sort_by]):
        df = df.sort_values(sort_by, kind="stable")
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, path)
    return path


def _in_order(col: pd.Series) -> bool:
    """Whether `col` has no nulls and never decreases, compared in arrow (str: UTF-8 byte order, the
    order sort_values gives) so a str column is not made into a Python object per row; False where
    arrow cannot compare it (the caller sorts)."""
    import pyarrow.compute as pc

    try:
        a = pa.array(col)
        return a.null_count == 0 and pc.all(pc.greater_equal(a[1:], a[:-1])).as_py() is not False
    except (pa.ArrowException, TypeError, ValueError):
        return False


def read_parquet(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def _clean(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalar
        v = v.item()
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, 6)
    return v


def is_run_key(key: str) -> bool:
    return not RUN_WORDS.isdisjoint(str(key).split("_"))


def split_run(metrics: Mapping[str, Any], run_keys: Iterable[str] = ()) -> tuple[dict, dict]:
    """(results, run info): entries whose key `is_run_key`, at any depth, or is named in `run_keys`
    (top level: counters such as `n_shards_generated` that a resume changes) go to run info, which
    keeps their nesting."""
    extra = set(run_keys)
    results: dict = {}
    run: dict = {}
    for k, v in metrics.items():
        if is_run_key(k) or k in extra:
            run[k] = v
        elif isinstance(v, Mapping):
            results[k], sub = split_run(v)
            if sub:
                run[k] = sub
        else:
            results[k] = v
    return results, run


def run_path(metrics_path: str | Path) -> Path:
    """metrics/pool.json -> metrics/pool.run.json (git-ignored by `*.run.json`, not a DVC out)."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}.run.json")


def write_metrics(path: str | Path, metrics: Mapping[str, Any], run_keys: Iterable[str] = ()) -> Path:
    """One JSON dict per stage (metrics/<stage>.json), floats rounded to 6 digits for stable diffs.

    Run-dependent entries (see `split_run`) are logged and written to `run_path(path)` instead."""
    path = Path(path)
    results, run = split_run(metrics, run_keys)
    write_json(path, _clean(results))
    rp = run_path(path)
    if run:
        text = json.dumps(_clean(run), sort_keys=True)
        log.info("%s: %s", rp, text)
        rp.write_text(text + "\n")
    else:
        rp.unlink(missing_ok=True)   # no stale timings of an older run beside these results
    return path


def read_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


SOURCES = ("real", "synthetic")


def source_order(sources: Iterable[str]) -> list[str]:
    """The keys of every `by_source`: real and synthetic always, then any other source, sorted."""
    return [*SOURCES, *sorted(set(map(str, sources)) - set(SOURCES))]


def selection_stats(n_in: Mapping[str, int], n_kept: Mapping[str, int], dropped: Mapping[str, int]) -> dict:
    """The stats vocabulary of every stage that selects images (dedup, leakage, prune; the funnel and the
    report read it): `n_in`, `n_kept`, `dropped` by reason, and `by_source` {source: {n_in, n_kept}}
    (real and synthetic always, 0 when absent). Inputs are counts by source and by reason; the dropped
    counts must add up to n_in − n_kept."""
    by = {s: {"n_in": int(n_in.get(s, 0)), "n_kept": int(n_kept.get(s, 0))}
          for s in source_order(n_in)}
    total_in, total_kept = sum(int(v) for v in n_in.values()), sum(int(v) for v in n_kept.values())
    drops = {str(r): int(n) for r, n in sorted(dropped.items()) if n}
    if sum(drops.values()) != total_in - total_kept:
        raise ValueError(f"dropped {drops} does not add up to {total_in} in - {total_kept} kept")
    return {"n_in": total_in, "n_kept": total_kept, "dropped": drops, "by_source": by}


def row_stats(sources: Iterable[str], kept: Iterable[bool], reasons: Iterable[str]) -> dict:
    """`selection_stats` of a manifest: one source, kept flag and reason (for dropped rows) per row."""
    from collections import Counter

    rows = list(zip(map(str, sources), map(bool, kept), map(str, reasons)))
    return selection_stats(Counter(s for s, _, _ in rows), Counter(s for s, k, _ in rows if k),
                           Counter(r for _, k, r in rows if not k))
