"""Duplicate removal on SSCD descriptors (paper §3.3 and App. D.1.4).

"For SSCD similarity detection, we use a k-NN algorithm to detect the most similar images to each one
[...] For the deduplication process, we use k=64. For each connected component of duplicates of the
associated k-NN graph, one image is selected randomly and the others are removed from the dataset.
To make the process faster, we use FAISS for k-NN computation." — with λ_dup = 0.6.

Pure functions on descriptor arrays (no images, no DVC); the kNN search is `pas.knn.knn_self`:
  duplicate_graph — edge i–j when cos > λ_dup (strictly above), made symmetric;
  dedup           — connected components, one seeded-random representative kept per component.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from pas.knn import INDEX_KINDS, IVF_CODES, check_descriptors, knn_self
from pas.params import check_choice, check_range, check_seed


@dataclass(frozen=True)
class DedupParams:
    """Parameters of the `dedup` stage (paper keys at the top level, the rest in `dedup:`)."""

    lambda_dup: float = 0.6        # λ_dup: SSCD cosine above which two images are duplicates
    k_dup: int = 64                # neighbours searched per image (paper App. D.1.4)
    seed: int = 0                  # picks each component's kept image
    index: str = "flat"            # faiss index: flat (exact) | ivf | simhash | hnsw | auto (flat ≤ 20k,
                                   # else ivf, or simhash when calibrated ivf would scan > 1% of lists)
    nlist: int = 0                 # ivf: inverted lists; 0 = 4·sqrt(n)
    nprobe: int = 0                # ivf: lists visited per query; 0 = calibrated to target_recall
    target_recall: float = 0.995   # ivf, nprobe 0: λ-edge recall in every 0.05 band above λ; simhash: at λ
    calib_queries: int = 4096      # ivf, nprobe 0: seeded sample whose exact λ-neighbours calibrate nprobe
    ivf_codes: str = "sq8"         # ivf list storage: sq8 (8-bit codes, exact re-rank) | flat (float32)
    hnsw_m: int = 32               # hnsw: graph degree
    ef_search: int = 128           # hnsw: search beam width
    use_gpu: bool = True           # faiss-gpu when it is installed and a GPU is visible
    resize: int | list[int] | None = None   # SSCD input: short side, or [H, W]; null = model preset
    batch_size: int = 64           # images per SSCD forward pass
    device: str = "auto"           # SSCD device: auto | cpu | cuda
    report_groups: int = 20        # duplicate groups shown in groups.html (paper Fig. 9/12)
    report_per_group: int = 12     # thumbnails per group

    def __post_init__(self) -> None:
        check_range("lambda_dup", self.lambda_dup, -1.0, 1.0, lo_open=False, hi_open=False)
        check_range("k_dup", self.k_dup, 1, None, lo_open=False)
        check_seed("seed", self.seed)
        check_choice("index", self.index, INDEX_KINDS)
        check_range("nlist", self.nlist, 0, None, lo_open=False)
        check_range("nprobe", self.nprobe, 0, None, lo_open=False)
        check_range("target_recall", self.target_recall, 0.0, 1.0, hi_open=False)
        check_range("calib_queries", self.calib_queries, 1, None, lo_open=False)
        check_choice("ivf_codes", self.ivf_codes, IVF_CODES)
        check_range("hnsw_m", self.hnsw_m, 2, None, lo_open=False)
        check_range("ef_search", self.ef_search, 1, None, lo_open=False)
        check_resize("resize", self.resize)
        check_range("batch_size", self.batch_size, 1, None, lo_open=False)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_range("report_groups", self.report_groups, 0, None, lo_open=False)
        check_range("report_per_group", self.report_per_group, 1, None, lo_open=False)


def check_resize(name: str, resize) -> None:
    from pas.params import ParamsError

    if resize is None:
        return
    if isinstance(resize, int):
        check_range(name, resize, 16, None, lo_open=False)
        return
    if len(resize) != 2 or not all(isinstance(v, int) and v >= 16 for v in resize):
        raise ParamsError(f"{name}={resize!r} must be a short side (int ≥ 16) or [H, W]")


# ------------------------------------------------------------------------------- graph + dedup

def duplicate_graph(sims: np.ndarray, ids: np.ndarray, n: int, lambda_dup: float):
    """Symmetric sparse adjacency (n × n, bool) with an edge i–j whenever j ∈ kNN(i) and
    cos(i, j) > λ_dup (strictly above, compared in float32 like the descriptors), or vice versa."""
    from scipy import sparse

    thr = np.float32(lambda_dup)
    mask = (sims > thr) & (ids >= 0)
    # the row of each edge, in the order of ids[mask]; np.repeat(arange(n), k)[mask] made an
    # n·k int64 array first (512 MB at 1M × 64) to keep a few edges of it
    rows = np.nonzero(mask)[0]
    cols = ids[mask]
    a = sparse.coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(n, n)).tocsr()
    return (a + a.T).astype(bool)


def seeded_rank(keys: Sequence[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random number per key (uint64), independent of the order of `keys`."""
    out = np.empty(len(keys), np.uint64)
    for i, k in enumerate(keys):
        h = hashlib.blake2b(f"{seed}\x1f{k}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little")
    return out


def components(adj) -> tuple[np.ndarray, np.ndarray]:
    """Connected components: (label per node, size per node)."""
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(adj, directed=False)
    sizes = np.bincount(labels)
    return labels.astype(np.int64), sizes[labels].astype(np.int64)


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({"key": pd.Series([], dtype=str), "kept": pd.Series([], dtype=bool),
                         "reason": pd.Series([], dtype=str), "score": pd.Series([], dtype=np.float32),
                         "component": pd.Series([], dtype=np.int64),
                         "component_size": pd.Series([], dtype=np.int64),
                         "representative": pd.Series([], dtype=str)})


def dedup_from_knn(keys: Sequence[str], sims: np.ndarray, ids: np.ndarray, lambda_dup: float,
                   seed: int = 0) -> pd.DataFrame:
    """Keep-manifest from a kNN result (see `dedup`)."""
    keys = [str(k) for k in keys]
    n = len(keys)
    if len(set(keys)) != n:
        from collections import Counter

        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise ValueError(f"duplicate key {dup!r} in the dedup input")
    if n == 0:
        return empty_manifest()
    adj = duplicate_graph(sims, ids, n, lambda_dup)
    labels, sizes = components(adj)
    rank = seeded_rank(keys, seed)
    karr = np.asarray(keys, dtype=object)
    # representative = member with the smallest seeded rank; equal ranks (p ≈ 2^-64) fall back to
    # key order: pre-sort by key, then a stable lexsort by (component, rank)
    by_key = np.argsort(karr, kind="stable")
    order = by_key[np.lexsort((rank[by_key], labels[by_key]))]
    first = np.ones(n, bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    rep_of_label = np.empty(labels.max() + 1, np.int64)
    rep_of_label[labels[order][first]] = order[first]
    rep = rep_of_label[labels]
    # component ids that do not depend on input order: by size (desc), then representative key
    label_size = np.bincount(labels)
    order_c = sorted(range(len(rep_of_label)), key=lambda c: (-int(label_size[c]), keys[rep_of_label[c]]))
    comp_id = np.empty(len(rep_of_label), np.int64)
    comp_id[np.asarray(order_c, np.int64)] = np.arange(len(rep_of_label))
    # score = best cosine to any kNN neighbour (> λ_dup exactly when the image has a duplicate)
    if sims.shape[1]:
        s = np.where(ids >= 0, sims, -np.inf).max(1)
        score = np.where(np.isfinite(s), s, np.nan).astype(np.float32)
    else:
        score = np.full(n, np.nan, np.float32)
    kept = rep == np.arange(n)
    return pd.DataFrame({
        "key": keys,
        "kept": kept,
        "reason": np.where(kept, "", "duplicate"),
        "score": score,
        "component": comp_id[labels],
        "component_size": sizes,
        "representative": karr[rep].astype(str),
    })


def dedup(keys: Sequence[str], x: np.ndarray, lambda_dup: float, k_dup: int = 64, seed: int = 0,
          progress: bool = False, **index_kw) -> pd.DataFrame:
    """Keep one image per connected component of the λ_dup-thresholded kNN graph.

    Returns a manifest with one row per input, in input order: key, kept, reason ("duplicate" for
    removed images), score (highest cosine to a kNN neighbour), component (0 = largest; ids sorted
    by size then representative key), component_size, representative (the kept key of the component).
    The kept image is the member with the smallest seeded hash of (seed, key): a uniform random
    choice that depends only on the seed and the component's keys, not on the input order.
    """
    x = check_descriptors(x)
    if len(keys) != len(x):
        raise ValueError(f"{len(keys)} keys for {len(x)} descriptors")
    if len(x) == 0:
        return empty_manifest()
    sims, ids = knn_self(x, k_dup, progress=progress, seed=seed, lambda_=lambda_dup, **index_kw)
    return dedup_from_knn(keys, sims, ids, lambda_dup, seed)


# a random-init SSCD gives unrelated images cosines of 0.92-0.999 (benchmarks/RESULTS-dedup.md): a threshold
# below this keeps almost nothing (`collapse_warning`, `pas check`)
RANDOM_SSCD_MIN_LAMBDA = 0.999


def collapse_warning(stage: str, metrics: dict, param: str, value: float, min_images: int = 20) -> str | None:
    """One line when an SSCD threshold stage (dedup, leakage) kept under half of ≥ `min_images`
    images (its `metrics` in the stats vocabulary): usually the threshold `param` is below what the
    SSCD gives unrelated images, as a random-init SSCD does at the paper's values. None otherwise."""
    n, kept = metrics["n_in"], metrics["n_kept"]
    if n < min_images or 2 * kept >= n:
        return None
    return (f"{stage} kept {kept} of {n} images at {param}={value:g}: unless they really are copies, this SSCD "
            f"scores unrelated images above {param} (a random-init SSCD needs >= {RANDOM_SSCD_MIN_LAMBDA:g}; "
            f"benchmarks/RESULTS-dedup.md)")


def summary(manifest: pd.DataFrame, source: Sequence[str] | None = None) -> dict:
    """metrics/dedup.json: the stats vocabulary (`pas.io.manifest.selection_stats`: n_in, n_kept,
    dropped by reason, by source; `source` per manifest row, else its `source` column, else real)
    and the duplicate groups: components_gt1, largest_component."""
    from pas.io.manifest import row_stats

    n_in = len(manifest)
    if source is None:
        source = manifest["source"] if "source" in manifest.columns else ["real"] * n_in
    sizes = manifest.loc[manifest["kept"], "component_size"].to_numpy() if n_in else np.zeros(0)
    out = row_stats(source, manifest["kept"], manifest["reason"])
    out.update({"components_gt1": int((sizes > 1).sum()), "largest_component": int(sizes.max()) if len(sizes) else 0})
    return out