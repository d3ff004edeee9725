"""Relative deduplication against evaluation test sets (paper §4.1 and App. D.1.4).

"To mitigate data leakage, an additional SSCD-based filtering step eliminates images resembling any in
the test sets of the traditional domain-specific datasets, using a lower similarity threshold of 0.45
to minimize false negatives." — "Regarding the data leak detection, we use k=32."

For every dataset image (the images `dedup` kept) we search its k_leak nearest test images (faiss,
inner product on L2-normalised SSCD descriptors) and drop it when any similarity is > λ_leak. The
decision depends only on the nearest test image; k_leak bounds `n_matches`, the number of test images
above λ_leak reported per dataset image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from pas.curate.dedup import check_descriptors, check_resize, knn_search
from pas.params import ParamsError, check_choice, check_range

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["key", "kept", "reason", "score", "nearest_key", "evalset", "n_matches"]


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


def iter_test_images(d: str | Path, max_side: int = 512) -> Iterator[tuple[str, object]]:
    """(key, PIL RGB) of a test folder: webdataset shards (`*.tar`) or an ImageFolder / flat folder
    of images (key = path relative to the folder). Unreadable files are skipped with a warning."""
    from pas.data.chunks import load_chunk, plan_chunks

    for item in plan_chunks(d, chunk=1 << 62):
        yield from load_chunk(item, max_side)


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


def summary(manifest: pd.DataFrame, n_test: dict[str, int], source: Sequence[str] | None = None) -> dict:
    """Counters for metrics/leakage.json: n_in, n_out, n_dropped, dropped per eval set (by nearest
    test image), test images per set; with `source` (per manifest row) also n_out_/dropped_ real and
    synthetic."""
    n_in = len(manifest)
    dropped = manifest.loc[~manifest["kept"]] if n_in else manifest
    per = {name: int((dropped["evalset"] == name).sum()) for name in sorted(n_test)}
    out = {"n_in": n_in, "n_out": int(n_in - len(dropped)), "n_dropped": int(len(dropped)),
           "dropped_per_evalset": per, "n_test": {k: int(v) for k, v in sorted(n_test.items())}}
    if source is not None:
        src = np.asarray(source, dtype=object)
        kept = manifest["kept"].to_numpy(bool) if n_in else np.zeros(0, bool)
        for name in ("real", "synthetic"):
            out[f"dropped_{name}"] = int(((src == name) & ~kept).sum())
            out[f"n_out_{name}"] = int(((src == name) & kept).sum())
    return out
