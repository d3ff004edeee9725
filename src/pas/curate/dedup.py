"""Duplicate removal on SSCD descriptors (paper §3.3 and App. D.1.4).

"For SSCD similarity detection, we use a k-NN algorithm to detect the most similar images to each one
[...] For the deduplication process, we use k=64. For each connected component of duplicates of the
associated k-NN graph, one image is selected randomly and the others are removed from the dataset.
To make the process faster, we use FAISS for k-NN computation." — with λ_dup = 0.6.

Pure functions on descriptor arrays (no images, no DVC):
  knn_self / knn_search — faiss inner-product kNN on L2-normalised descriptors (exact by default);
  duplicate_graph      — edge i–j when cos > λ_dup (strictly above), made symmetric;
  dedup                — connected components, one seeded-random representative kept per component.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from pas.params import check_choice, check_range, check_seed

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw", "auto")
IVF_CODES = ("sq8", "flat")   # what an IVF list stores per vector: 8-bit scalar codes or float32
AUTO_FLAT_MAX = 200_000       # `auto`: exact search up to this many images, IVF above
AUTO_IVF_MAX_PROBE = 0.2      # `auto`: back to exact search when calibrated IVF must scan more of the lists
IVF_TRAIN_PER_LIST = 39       # IVF k-means training points per inverted list (faiss: ≥ 39)
IVF_TRAIN_ITERS = 8           # IVF k-means iterations
CALIB_BAND = 0.05             # calibration: nprobe must reach the target in each band (λ, λ+0.05], …
CALIB_MIN_EDGES = 20          # … that holds at least this many sampled λ-edges
CALIB_MARGIN = 1.25           # nprobe = margin × the sampled quantile (the sample's quantile is noisy)
GPU_MAX_NPROBE = 2048         # faiss-gpu IVF limit
CHECK_BLOCK = 65_536           # rows per block when checking descriptors (bounds the temporaries)
MANIFEST_COLUMNS = ["key", "kept", "reason", "score", "component", "component_size", "representative"]


@dataclass(frozen=True)
class DedupParams:
    """Parameters of the `dedup` stage (paper keys at the top level, the rest in `dedup:`)."""

    lambda_dup: float = 0.6        # λ_dup: SSCD cosine above which two images are duplicates
    k_dup: int = 64                # neighbours searched per image (paper App. D.1.4)
    seed: int = 0                  # picks each component's kept image
    index: str = "flat"            # faiss index: flat (exact) | ivf | hnsw | auto (flat ≤ 200k, else
                                   # ivf, or flat again when calibrated ivf would scan > 20% of lists)
    nlist: int = 0                 # ivf: inverted lists; 0 = 4·sqrt(n)
    nprobe: int = 0                # ivf: lists visited per query; 0 = calibrated to target_recall
    target_recall: float = 0.995   # ivf, nprobe 0: λ-edge recall to reach in every 0.05 band above λ
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


# ------------------------------------------------------------------------------- descriptors

def check_descriptors(x: np.ndarray, name: str = "descriptors", dim: int | None = None,
                      atol: float = 1e-3) -> np.ndarray:
    """Return `x` as C-contiguous float32 (N, D), refusing wrong shapes, NaNs and unnormalised rows."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: descriptor dimension {x.shape[1]} does not match {dim} "
                         "(descriptors of different SSCD models cannot be compared)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    # in row blocks: isfinite and norm of the whole array allocate an N × D temporary (norm: a float32
    # copy, 2 GB at 1M × 512, benchmarks/RESULTS-scale.md); each row's norm is computed the same way
    blocks = range(0, len(x), CHECK_BLOCK)
    if not all(np.isfinite(x[s:s + CHECK_BLOCK]).all() for s in blocks):
        raise ValueError(f"{name}: contains NaN or inf")
    for s in blocks:
        norms = np.linalg.norm(x[s:s + CHECK_BLOCK], axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > atol)
        if len(bad):
            raise ValueError(f"{name}: row {s + bad[0]} has norm {norms[bad[0]]:.4f}; descriptors must be "
                             "L2-normalised (SSCD outputs are)")
    return x


# ----------------------------------------------------------------------------------------- kNN

def _faiss():
    import faiss

    return faiss


def _gpu_ok(use_gpu: bool) -> bool:
    if not use_gpu:
        return False
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(xb: np.ndarray, index: str = "flat", nlist: int = 0, nprobe: int = 8, hnsw_m: int = 32,
                ef_search: int = 128, use_gpu: bool = True, seed: int = 0, ivf_codes: str = "sq8",
                lambda_: float | None = None, target_recall: float = 0.995, calib_queries: int = 4096,
                xq: np.ndarray | None = None, info: dict | None = None):
    """A faiss inner-product index over rows of `xb` (float32, L2-normalised).

    `ivf` with `ivf_codes="sq8"` scans 8-bit codes (a quarter of the bytes of float32 lists, so ~1.7x
    faster scans on CPU, measured in benchmarks/RESULTS-dedup.md) and re-ranks the k candidates of each
    query with the float32 vectors (faiss IndexRefineFlat, k_factor 1): every similarity returned is
    exact, so the λ tests downstream never see quantisation error; only recall is approximate.
    `ivf` with `nprobe=0` picks nprobe from the data (`calibrate_nprobe`: the λ-edges of a seeded
    sample of queries, `lambda_` required; `xq` = the queries, None = a self-join of `xb`); `auto` above
    AUTO_FLAT_MAX rows calibrates too and falls back to exact search when nprobe would exceed
    AUTO_IVF_MAX_PROBE of the lists. `info`, if given, receives the IVF settings used and the
    calibration's estimates.
    """
    faiss = _faiss()
    n, d = xb.shape
    kind = index
    if kind == "auto":
        kind = "flat" if n <= AUTO_FLAT_MAX else "ivf"
    gpu = kind in ("flat", "ivf") and _gpu_ok(use_gpu)
    if kind == "ivf":
        check_choice("ivf_codes", ivf_codes, IVF_CODES)
        nl = nlist or max(1, int(4 * np.sqrt(n)))
        nl = min(nl, max(1, n // 39))        # faiss wants ≥ 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        if ivf_codes == "sq8":
            base = faiss.IndexIVFScalarQuantizer(quantizer, d, nl, faiss.ScalarQuantizer.QT_8bit,
                                                 faiss.METRIC_INNER_PRODUCT)
        else:
            base = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
        base.cp.seed = seed
        base.cp.niter = IVF_TRAIN_ITERS
        # k-means on a seeded sample of ≤ IVF_TRAIN_PER_LIST points per list: training on all points
        # would cost as much as half an exact search at 100k (fewer points lost recall, measured)
        n_train = min(n, IVF_TRAIN_PER_LIST * nl)
        sample = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)) if n_train < n else None
        base.train(xb if sample is None else xb[sample])
        stats = {"index": "ivf", "nlist": nl}
        calibrated = nprobe == 0
        if calibrated:
            if lambda_ is None:
                raise ValueError("ivf with nprobe 0 (calibrated) needs lambda_")
            centroids = quantizer.reconstruct_n(0, nl)
            nprobe, cal = calibrate_nprobe(xb, centroids, lambda_, target_recall, calib_queries, seed, xq=xq)
            stats.update(cal)
        nprobe = min(nprobe, nl, GPU_MAX_NPROBE) if gpu else min(nprobe, nl)
        stats["nprobe"] = nprobe
        if index == "auto" and calibrated and nprobe > AUTO_IVF_MAX_PROBE * nl:
            # no cluster structure to exploit (random-like data): the scan would cost about as much as
            # exact search (benchmarks/RESULTS-dedup.md)
            kind = "flat"
            stats["index"], stats["ivf_nprobe"] = "flat", stats.pop("nprobe")
        if info is not None:
            info.update(stats)
    if kind == "ivf":
        base.nprobe = nprobe
        if gpu:
            base = _to_gpu(faiss, base)
        if ivf_codes == "sq8":
            idx = faiss.IndexRefineFlat(base)
            idx.k_factor = 1.0                # faiss keeps `base` alive (referenced_objects)
        else:
            idx = base
    elif kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efSearch = ef_search
    else:
        idx = faiss.IndexFlatIP(d)
        if gpu:
            idx = _to_gpu(faiss, idx)
    idx.add(xb)
    return idx


def probe_ranks(xb: np.ndarray, centroids: np.ndarray, lambda_: float, q: np.ndarray,
                xq: np.ndarray | None = None, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact λ-edges of the queries `q` and the nprobe each edge needs to be found: (cos, need), per edge.

    `q`: row ids into `xq` (into `xb` for a self-join, `xq=None`). An edge is a database row j with
    cos(query, j) > λ (float32, strictly; j ≠ the query itself in a self-join), from an exact faiss range
    search of the queries against every row of `xb` (|q| × n × d). A query scanning its `nprobe` nearest
    centroids finds j when j's list is among them: need = 1 + (centroids closer to the query than j's).
    In a self-join the graph is symmetric, so the edge is also found when j's scan reaches the query's
    list: need = the smaller of the two.
    """
    faiss = _faiss()
    self_join = xq is None
    xs = xb[q] if self_join else xq[q]
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    lims, sims, ids = flat.range_search(xs, float(lambda_))
    src = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
    keep = sims > np.float32(lambda_)
    if self_join:
        keep &= ids != q[src]
    src, sims, ids = src[keep], sims[keep], ids[keep]
    need = np.empty(len(ids), np.int64)
    cq = xs @ centroids.T                                      # (|q|, nlist)
    list_q = cq.argmax(1)
    for s in range(0, len(ids), chunk):
        e = slice(s, s + chunk)
        cb = xb[ids[e]] @ centroids.T                          # (E, nlist) cos of each neighbour j
        list_j = cb.argmax(1)
        at = cq[src[e], list_j]                                # query's cos to j's centroid
        need[e] = (cq[src[e]] > at[:, None]).sum(1) + 1
        if self_join:
            back = (cb > cb[np.arange(len(list_j)), list_q[src[e]]][:, None]).sum(1) + 1
            need[e] = np.minimum(need[e], back)
    return sims, need


def calibrate_nprobe(xb: np.ndarray, centroids: np.ndarray, lambda_: float, target: float,
                     n_queries: int, seed: int = 0, xq: np.ndarray | None = None,
                     margin: float = CALIB_MARGIN) -> tuple[int, dict]:
    """nprobe for λ-edge recall ≥ `target` in every band (λ, λ+0.05], (λ+0.05, λ+0.1], … of cosine.

    Samples `n_queries` queries (seeded), finds their exact λ-edges (`probe_ranks`), takes in each band
    with ≥ CALIB_MIN_EDGES edges the `target` quantile of the nprobe the edges need (all edges pooled
    when no band has that many), and returns ceil(margin × the largest), ≥ 1, with its estimates:
    calib_edges (sampled λ-edges), est_recall (fraction of them found at that nprobe) and
    est_recall_near (the same in the band just above λ; None without edges there).
    """
    nq = len(xb) if xq is None else len(xq)
    s = min(n_queries, nq)
    q = np.sort(np.random.default_rng(seed).choice(nq, s, replace=False)) if s < nq else np.arange(nq)
    sims, need = probe_ranks(xb, centroids, lambda_, q, xq)
    if len(need) == 0:
        p = 1
    else:
        band = np.floor((sims.astype(np.float64) - lambda_) / CALIB_BAND).astype(np.int64)
        counts = np.bincount(band)
        full = np.flatnonzero(counts >= CALIB_MIN_EDGES)
        pools = [need[band == b] for b in full] if len(full) else [need]
        p = max(int(np.quantile(v, target, method="higher")) for v in pools)
        p = max(1, int(np.ceil(margin * p)))
    near = need[sims <= lambda_ + CALIB_BAND]
    stats = {"calib_queries": int(s), "calib_edges": int(len(need)),
             "est_recall": round(float((need <= p).mean()), 4) if len(need) else None,
             "calib_edges_near": int(len(near)),
             "est_recall_near": round(float((near <= p).mean()), 4) if len(near) else None}
    log.info("ivf: nprobe %d of %d lists from %d λ-edges of %d sampled queries (est. recall %s, %s in "
             "(λ, λ+%.2f])", p, len(centroids), stats["calib_edges"], s, stats["est_recall"],
             stats["est_recall_near"], CALIB_BAND)
    return p, stats


def _to_gpu(faiss, idx):
    res = faiss.StandardGpuResources()
    idx = faiss.index_cpu_to_gpu(res, 0, idx)
    # keep the resources alive with the index; faiss ≥ 1.12 refuses unknown attributes on its
    # objects but allows `referenced_objects`, its own keep-alive list
    idx.referenced_objects = list(getattr(idx, "referenced_objects", None) or []) + [res]
    return idx


def knn_search(xb: np.ndarray, xq: np.ndarray, k: int, chunk: int = 16_384, progress: bool = False,
               self_join: bool = False, **index_kw) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of each row of `xq` among rows of `xb`: (sims, ids), each (Nq, k').

    k' = min(k, len(xb)); missing results (approximate indexes) have id -1 and sim -inf.
    `self_join`: `xq` is `xb` (a calibrated IVF then counts an edge found from either end).
    """
    xb = check_descriptors(xb, "database")
    xq = check_descriptors(xq, "queries", dim=xb.shape[1] if len(xb) else None)
    k = min(k, len(xb))
    if k == 0 or len(xq) == 0:
        return np.zeros((len(xq), k), np.float32), np.full((len(xq), k), -1, np.int64)
    idx = build_index(xb, xq=None if self_join else xq, **index_kw)
    sims = np.empty((len(xq), k), np.float32)
    ids = np.empty((len(xq), k), np.int64)
    starts = range(0, len(xq), chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="kNN", unit="chunk")
    for s in starts:
        D, I = idx.search(xq[s:s + chunk], k)
        sims[s:s + chunk], ids[s:s + chunk] = D, I
    sims[ids < 0] = -np.inf
    return sims, ids


def knn_self(x: np.ndarray, k: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """k nearest *other* rows of each row of `x`: (sims, ids), each (N, min(k, N−1)), -1/-inf padded.

    Searches k+1 and removes the row itself wherever it appears (with exact copies it need not come
    first), keeping the k best others.
    """
    n = len(x)
    k = min(k, max(n - 1, 0))
    if k == 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    sims, ids = knn_search(x, x, k + 1, self_join=True, **kw)
    self_hit = ids == np.arange(n)[:, None]
    # rows where self was not returned drop their last (worst) result instead
    drop = self_hit.copy()
    drop[~self_hit.any(1), -1] = True
    keep = ~drop
    return sims[keep].reshape(n, k), ids[keep].reshape(n, k)


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

    n = adj.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
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