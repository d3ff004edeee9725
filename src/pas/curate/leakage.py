"""Relative deduplication against evaluation test sets (paper §4.1 and App. D.1.4).

"To mitigate data leakage, an additional SSCD-based filtering step eliminates images resembling any in
the test sets of the traditional domain-specific datasets, using a lower similarity threshold of 0.45
to minimize false negatives." — "Regarding the data leak detection, we use k=32."

For every collected image (every dedup input, not only the images dedup kept) we search its k_leak
nearest test images (faiss, inner product on L2-normalised SSCD descriptors); an image leaks when its
nearest test image has similarity > λ_leak. k_leak bounds `n_matches`, the number of test images above
λ_leak reported per image.

`scope` (`leakage.scope`) decides what a leak removes:
- "component" (default): the whole dedup component of a leaking image. If a and b are duplicates,
  dedup keeps a and b is close to a test image, a carries b's content into the dataset, so a goes too
  (DINOv2's retrieval curation, where the 0.45 threshold comes from, discards such components whole).
- "image": only the kept images whose own descriptor leaks (the earlier behaviour).
The manifest has one row per image dedup kept; the metrics count what either scope would drop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pas.curate.dedup import check_resize
from pas.knn import check_descriptors, knn_search
from pas.params import ParamsError, check_choice, check_range

log = logging.getLogger(__name__)

SCOPES = ("component", "image")


@dataclass(frozen=True)
class LeakageParams:
    """Parameters of the `leakage` stage (paper keys at the top level, the rest in `leakage:`)."""

    lambda_leak: float = 0.45      # λ_leak: SSCD cosine to a test image above which an image is dropped
    k_leak: int = 32               # test images searched per dataset image (paper App. D.1.4)
    evalsets: list[str] = field(default_factory=list)   # set names under the evalsets dir; [] = all
    split: str = "test"            # split compared against (sub-folder of each set, if present)
    batch_size: int = 64           # test images per SSCD forward pass
    device: str = "auto"           # SSCD device: auto | cpu | cuda
    use_gpu: bool = True           # faiss-gpu when installed and a GPU is visible
    max_side: int = 512            # ImageFolder test images are downscaled to this longer side on load
    resize: int | list[int] | None = None   # must equal the dedup descriptors' resize; null = take theirs
    scope: str = "component"       # a leak drops its whole dedup component | only the leaking kept image

    def __post_init__(self) -> None:
        check_range("lambda_leak", self.lambda_leak, -1.0, 1.0, lo_open=False, hi_open=False)
        check_range("k_leak", self.k_leak, 1, None, lo_open=False)
        for name in self.evalsets:
            if not name or "/" in name or name.startswith("."):
                raise ParamsError(f"evalsets: {name!r} is not a set name (a sub-folder of the evalsets dir)")
        if not self.split or "/" in self.split:
            raise ParamsError(f"split={self.split!r} must be a sub-folder name")
        check_range("batch_size", self.batch_size, 1, None, lo_open=False)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_range("max_side", self.max_side, 16, None, lo_open=False)
        check_resize("resize", self.resize)
        check_choice("scope", self.scope, SCOPES)


# ------------------------------------------------------------------------------- test images

def resolve_evalsets(root: str | Path | None, names: Sequence[str], split: str = "test",
                     extra: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """name → directory of its test images.

    A set `<root>/<name>` contributes `<root>/<name>/<split>` when that exists (the `evalsets` stage's
    layout), else the set folder itself; `names` = [] takes every sub-folder of `root`. `extra` adds
    user folders (webdataset dir or ImageFolder) by name.
    """
    out: dict[str, Path] = {}
    if root is not None:
        root = Path(root)
        if names:
            chosen = list(names)
        elif root.is_dir():
            chosen = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        else:
            chosen = []
        for name in chosen:
            d = root / name
            if not d.is_dir():
                raise FileNotFoundError(f"eval set {name!r}: {d} does not exist (leakage.evalsets names "
                                        f"sub-folders of {root})")
            out[name] = d / split if (d / split).is_dir() else d
    for name, d in (extra or {}).items():
        d = Path(d)
        if name in out:
            raise ValueError(f"eval set {name!r} given twice")
        if not d.is_dir():
            raise FileNotFoundError(f"eval set {name!r}: {d} is not a directory")
        out[name] = d / split if (d / split).is_dir() else d
    return out


# ------------------------------------------------------------------------------------ leakage

def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({"key": pd.Series([], dtype=str), "kept": pd.Series([], dtype=bool),
                         "reason": pd.Series([], dtype=str), "score": pd.Series([], dtype=np.float32),
                         "nearest_key": pd.Series([], dtype=str), "evalset": pd.Series([], dtype=str),
                         "n_matches": pd.Series([], dtype=np.int64)})


def leakage(keys: Sequence[str], x: np.ndarray, test_keys: Sequence[str], test_sets: Sequence[str],
            xt: np.ndarray, lambda_leak: float, k_leak: int = 32, **index_kw) -> pd.DataFrame:
    """Keep-manifest of dataset images (`keys`, descriptors `x`) against test images (`xt`).

    One row per dataset image, in input order: kept (False when the nearest test image has
    cos > λ_leak, strictly), reason ("leak" when dropped), score (cos to the nearest test image,
    NaN without test images), nearest_key / evalset (that test image and its set), n_matches (test
    images with cos > λ_leak among the k_leak nearest).
    """
    x = check_descriptors(x, "dataset descriptors")
    xt = check_descriptors(xt, "test descriptors", dim=x.shape[1] if len(x) and len(xt) else None)
    if len(keys) != len(x):
        raise ValueError(f"{len(keys)} keys for {len(x)} dataset descriptors")
    if not (len(test_keys) == len(test_sets) == len(xt)):
        raise ValueError(f"{len(test_keys)} test keys / {len(test_sets)} set names for {len(xt)} test descriptors")
    n = len(keys)
    if n == 0:
        return empty_manifest()
    if len(xt) == 0:
        return pd.DataFrame({"key": list(map(str, keys)), "kept": np.ones(n, bool), "reason": [""] * n,
                             "score": np.full(n, np.nan, np.float32), "nearest_key": [""] * n,
                             "evalset": [""] * n, "n_matches": np.zeros(n, np.int64)})
    sims, ids = knn_search(xt, x, k_leak, **index_kw)         # (N, k) cosine to test images
    thr = np.float32(lambda_leak)
    top = sims[:, 0]
    nearest = ids[:, 0]
    tk = np.asarray(list(map(str, test_keys)), dtype=object)
    ts = np.asarray(list(map(str, test_sets)), dtype=object)
    ok = nearest >= 0
    kept = ~(ok & (top > thr))
    return pd.DataFrame({
        "key": list(map(str, keys)),
        "kept": kept,
        "reason": np.where(kept, "", "leak"),
        "score": np.where(ok, top, np.nan).astype(np.float32),
        "nearest_key": np.where(ok, tk[np.maximum(nearest, 0)], "").astype(str),
        "evalset": np.where(ok, ts[np.maximum(nearest, 0)], "").astype(str),
        "n_matches": ((sims > thr) & (ids >= 0)).sum(1).astype(np.int64),
    })


def by_component(checked: pd.DataFrame, component: Sequence[int], dedup_kept: Sequence[bool],
                 scope: str = "component") -> pd.DataFrame:
    """Keep-manifest of the images dedup kept, from `checked` = `leakage(...)` over every dedup input.

    `component[i]` / `dedup_kept[i]`: row i's dedup component id and whether dedup kept it.
    `component_leaks`: some member of the image's component (itself included) leaks. scope "image"
    drops a kept image that leaks itself (reason "leak"); scope "component" drops every kept image
    with `component_leaks` (reason "leak", or "leak_component" when only another member leaks).
    score, nearest_key, evalset and n_matches describe `via`: the image itself in scope "image", the
    component member most similar to a test image in scope "component" (ties: first row).
    Rows keep the order of `checked`.
    """
    check_choice("scope", scope, SCOPES)
    comp = np.asarray(component, dtype=np.int64)
    kept_d = np.asarray(dedup_kept, dtype=bool)
    if not (len(checked) == len(comp) == len(kept_d)):
        raise ValueError(f"{len(checked)} checked rows, {len(comp)} components, {len(kept_d)} dedup flags")
    if len(checked) == 0:
        return empty_manifest().assign(via=pd.Series([], dtype=str), component=pd.Series([], dtype=np.int64),
                                       component_leaks=pd.Series([], dtype=bool))
    leaks = ~checked["kept"].to_numpy(bool)
    _, c = np.unique(comp, return_inverse=True)            # dense component index per row
    comp_leaks = (np.bincount(c, weights=leaks) > 0)[c]
    if scope == "image":
        best = np.arange(len(checked))
        drop = leaks
    else:
        # per component, the row with the highest score (NaN = no test images: lowest), first on ties
        score = np.nan_to_num(checked["score"].to_numpy(np.float64), nan=-np.inf)
        order = np.lexsort((np.arange(len(c)), -score, c))
        first = np.r_[True, c[order][1:] != c[order][:-1]]
        best = order[first][c]                               # c[order][first] = 0, 1, 2, ... in order
        drop = comp_leaks
    reason = np.where(leaks, "leak", np.where(drop, "leak_component", ""))
    out = pd.DataFrame({
        "key": checked["key"].astype(str).to_numpy(),
        "kept": ~drop,
        "reason": reason,
        "score": checked["score"].to_numpy(np.float32)[best],
        "nearest_key": checked["nearest_key"].astype(str).to_numpy()[best],
        "evalset": checked["evalset"].astype(str).to_numpy()[best],
        "n_matches": checked["n_matches"].to_numpy(np.int64)[best],
        "via": checked["key"].astype(str).to_numpy()[best],
        "component": comp,
        "component_leaks": comp_leaks,
    })
    return out.loc[kept_d].reset_index(drop=True)


def summary(manifest: pd.DataFrame, n_test: dict[str, int], source: Sequence[str] | None = None,
            checked: pd.DataFrame | None = None) -> dict:
    """metrics/leakage.json: the stats vocabulary (`pas.io.manifest.selection_stats`: n_in, n_kept,
    dropped by reason — leak, leak_component —, by source; `source` per manifest row, else real),
    dropped per eval set (by nearest test image), test images per set, what either scope drops
    (dropped_if_image_scope, dropped_if_component_scope: a `by_component` manifest), and with `checked`
    (every dedup input) n_checked and n_checked_leaking."""
    from pas.io.manifest import row_stats

    n_in = len(manifest)
    dropped = manifest.loc[~manifest["kept"]] if n_in else manifest
    out = row_stats(source if source is not None else ["real"] * n_in, manifest["kept"], manifest["reason"])
    out["dropped_per_evalset"] = {name: int((dropped["evalset"] == name).sum()) for name in sorted(n_test)}
    out["n_test"] = {k: int(v) for k, v in sorted(n_test.items())}
    if "component_leaks" in manifest.columns:
        out["dropped_if_image_scope"] = int((manifest["reason"].astype(str) == "leak").sum())
        out["dropped_if_component_scope"] = int(manifest["component_leaks"].astype(bool).sum())
    if checked is not None:
        out["n_checked"] = int(len(checked))
        out["n_checked_leaking"] = int((~checked["kept"].astype(bool)).sum())
    return out


def load_dedup(dedup_dir: Path) -> tuple[list[str], list[str], np.ndarray, dict, np.ndarray, np.ndarray]:
    """Every dedup input (sorted by key): keys, sources, descriptors, the descriptors' provenance
    (descriptors.json), dedup component ids and dedup's kept flags."""
    for name in ("manifest.parquet", "keys.parquet", "descriptors.npy", "descriptors.json"):
        if not (dedup_dir / name).is_file():
            raise FileNotFoundError(f"{dedup_dir / name}: missing (run the dedup stage first)")
    from pas.io.manifest import read_parquet

    manifest = read_parquet(dedup_dir / "manifest.parquet")
    order = read_parquet(dedup_dir / "keys.parquet")
    x = np.load(dedup_dir / "descriptors.npy")
    info = json.loads((dedup_dir / "descriptors.json").read_text())
    if len(order) != len(x):
        raise ValueError(f"{dedup_dir}: keys.parquet has {len(order)} rows but descriptors.npy {len(x)}")
    if "component" not in manifest.columns:
        raise ValueError(f"{dedup_dir}/manifest.parquet has no 'component' column: rerun dedup")
    m = manifest.assign(key=manifest["key"].astype(str)).set_index("key")
    src = order["source"] if "source" in order.columns else ["real"] * len(order)
    rows = sorted((str(k), int(r), str(s)) for r, k, s in zip(order["row"], order["key"], src))
    keys = [k for k, _, _ in rows]
    missing = [k for k in keys if k not in m.index]
    if missing:
        raise ValueError(f"{dedup_dir}: {len(missing)} descriptor key(s) not in manifest.parquet, e.g. {missing[0]!r}")
    sources = [s for _, _, s in rows]
    xs = x[[r for _, r, _ in rows]] if rows else x[:0]
    comp = m.loc[keys, "component"].to_numpy(np.int64) if rows else np.zeros(0, np.int64)
    kept = m.loc[keys, "kept"].to_numpy(bool) if rows else np.zeros(0, bool)
    return keys, sources, xs, info, comp, kept
