"""Pareto-front pruning of the OOD-scored images: which images the final dataset keeps (paper §3.3).

Paper: "an image I is considered less suitable than the image J (and therefore prioritized for
removal) if it shows higher OOD scores across the metrics"; kneedle on the per-front mean of each
metric against the cumulative number removed gives three knees and "by selecting the maximum X value
among the three knees (one per metric), we can estimate the most efficient halt point"; "the Pareto
optimization process also provides a structured guidance for filtering the dataset down to any
desired size".

`select` is the pure selection (scores in, front rank + removed flag + summary out; no image is
read); `pas.curate.export.export_dataset` then writes the images of the kept ids (issue 15's split);
`dataset_funnel` assembles the per-stage dataset sizes for metrics/dataset.json.
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

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pas.params import ParamsError, check_choice, check_range, check_seed, renamed

log = logging.getLogger(__name__)

METRICS = ("ood_b", "ood_bprime", "ood_blur_delta")
STOPS = ("knee", "target_size", "max_fronts")

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
    shard_size: int = 10_000            # images per output shard (contract: <= 10k)
    sort_buffer_mb: int = 1024          # kept samples (image + JSON + 32 B) in RAM before spilling a sorted run
    sample_fronts: tuple[int, ...] = (1, 10, 100)  # "Pareto n" rows of the sample grid (1 = removed first)
    sample_per_front: int = 8           # images per row of the sample grid
    seed: int = 0                       # top-level seed: which images the sample grid shows
    takedown: str | None = None         # file of keys / URLs left out of the dataset (read_takedown)
    license: str = "other"              # the dataset card's licence (a Hugging Face licence id)

    REMOVED_KEYS = {"shard_maxcount": renamed("prune.shard_size")}   # keys of older params.yaml files

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
        check_range("shard_size", self.shard_size, 1, 10_000, lo_open=False, hi_open=False)
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
