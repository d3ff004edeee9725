"""Parquet manifests and JSON metrics, written reproducibly (sorted rows, sorted keys)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def write_parquet(df: pd.DataFrame, path: str | Path, sort_by: str | None = "key") -> Path:
    """Write `df` sorted by `sort_by` (stable) without the pandas index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sort_by is not None and sort_by in df.columns and len(df):
        df = df.sort_values(sort_by, kind="stable")
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, path)
    return path


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


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """One JSON dict per stage (metrics/<stage>.json), floats rounded to 6 digits for stable diffs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(metrics), indent=2, sort_keys=True) + "\n")
    return path


def read_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
