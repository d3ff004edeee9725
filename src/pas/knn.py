"""Inner-product kNN with faiss on L2-normalised descriptors: the search behind dedup (a self-join of
the SSCD descriptors) and leakage (images against eval test images).

  check_descriptors     — float32 (N, D), finite, unit rows, or one clear error;
  build_index           — flat (exact, the default) | ivf (8-bit codes + exact re-rank, nprobe calibrated
                          to a λ-edge recall) | simhash (a Hamming scan of sign codes + exact re-rank) |
                          hnsw | auto; on GPU when faiss-gpu sees one;
  knn_search / knn_self — top-k (sims, ids) of queries / of each row among the *other* rows.
"""

from __future__ import annotations

import logging

import numpy as np

from pas.params import check_choice

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "simhash", "hnsw", "auto")
IVF_CODES = ("sq8", "flat")   # what an IVF list stores per vector: 8-bit scalar codes or float32
AUTO_FLAT_MAX = 20_000        # `auto`: exact search up to this many images, IVF (or simhash) above
AUTO_IVF_MAX_PROBE = 0.01     # `auto` on CPU: simhash when calibrated IVF must scan more of the lists, …
AUTO_IVF_MAX_PROBE_GPU = 0.2  # … on GPU: flat
IVF_TRAIN_PER_LIST = 39       # IVF k-means training points per inverted list (faiss: ≥ 39)
IVF_TRAIN_ITERS = 8           # IVF k-means iterations
CALIB_BAND = 0.05             # calibration: nprobe must reach the target in each band (λ, λ+0.05], …
CALIB_MIN_EDGES = 20          # … that holds at least this many sampled λ-edges
CALIB_MARGIN = 1.25           # nprobe = margin × the sampled quantile (the sample's quantile is noisy)
AUTO_SIMHASH_MAX_EDGES = 0.01  # `auto`: flat, not simhash, when calibration finds more λ-edges per query × n
SIMHASH_MAX_FALSE = 16        # simhash: the fewest bits whose expected unrelated (cos 0) candidates per query ≤ this
SIMHASH_MAX_BITS = 1024
SIMHASH_BLOCK_PAIRS = 1 << 22  # simhash: candidate pairs per block of queries (bounds the re-rank's memory)
GPU_MAX_NPROBE = 2048         # faiss-gpu IVF limit
CHECK_BLOCK = 65_536           # rows per block when checking descriptors (bounds the temporaries)


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

    `ivf` with `ivf_codes="sq8"` scans 8-bit codes (a quarter of the bytes of float32 lists) and
    re-ranks the k candidates of each query with the float32 vectors (faiss IndexRefineFlat, k_factor 1):
    every similarity returned is exact, so the λ tests downstream never see quantisation error; only
    recall is approximate. `ivf` with `nprobe=0` picks nprobe from the data (`calibrate_nprobe`: the
    λ-edges of a seeded sample of queries, `lambda_` required; `xq` = the queries, None = a self-join of
    `xb`). `simhash` (`SimHashIndex`, `lambda_` required) finds each pair above λ with probability ≥
    `target_recall`, exact similarities too. `auto` above AUTO_FLAT_MAX rows calibrates IVF and, when
    nprobe would exceed AUTO_IVF_MAX_PROBE of the lists, uses simhash instead (flat when the sample's
    λ-edges are dense, or on GPU above AUTO_IVF_MAX_PROBE_GPU). `info`, if given, receives the settings
    used and the estimates.
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
        max_probe = AUTO_IVF_MAX_PROBE_GPU if gpu else AUTO_IVF_MAX_PROBE
        if index == "auto" and calibrated and nprobe > max_probe * nl:
            # little cluster structure (random-like data): scanning that many lists costs more than a
            # Hamming scan of every row on CPU (benchmarks/RESULTS-dedup.md), unless most pairs are
            # λ-edges anyway (each candidate costs a gathered re-rank)
            dense = stats["calib_edges"] > AUTO_SIMHASH_MAX_EDGES * n * stats["calib_queries"]
            kind = "flat" if gpu or dense else "simhash"
            stats["index"], stats["ivf_nprobe"] = kind, stats.pop("nprobe")
        if info is not None:
            info.update(stats)
    if kind == "simhash":
        if lambda_ is None:
            raise ValueError("simhash needs lambda_ (its Hamming radius is set from it)")
        idx = SimHashIndex(xb, lambda_, target_recall, seed=seed)
        if info is not None:
            info.update(idx.stats)
            idx.stats = info                  # search() adds its candidate count
        return idx
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


def simhash_bits(n: int, p: float, target: float) -> int:
    """Bits (a multiple of 64, ≤ SIMHASH_MAX_BITS) for a database of `n` rows and a pair flip rate `p` at λ:
    the fewest whose radius lets ≤ SIMHASH_MAX_FALSE unrelated rows per query through, an unrelated
    (orthogonal) pair's Hamming distance being Binomial(bits, 1/2). More bits separate λ from 0 better
    but cost a longer scan."""
    from scipy.stats import binom

    for bits in range(64, SIMHASH_MAX_BITS + 1, 64):
        if n * binom.cdf(binom.ppf(target, bits, p), bits, 0.5) <= SIMHASH_MAX_FALSE:
            return bits
    return SIMHASH_MAX_BITS


class SimHashIndex:
    """Top-k exact inner products among the rows whose SimHash codes are within a Hamming radius of the
    query's: a brute-force scan of `bits`-bit sign codes (faiss IndexBinaryFlat.range_search; 0 =
    `simhash_bits` of n and λ), then an exact float32 re-rank of the candidates.

    Charikar's random-hyperplane signs: a pair at cosine c falls on opposite sides of each of `bits`
    seeded Gaussian hyperplanes independently with probability arccos(c)/π, so its Hamming distance is
    Binomial(bits, arccos(c)/π). The radius is the smallest r with P(Binomial(bits, arccos(λ)/π) ≤ r) ≥
    `target`: every pair with cos ≥ λ is a candidate with probability ≥ `target` whatever the data's
    structure; unrelated pairs (cos near 0, Hamming near bits/2) rarely are. Queries go in blocks of
    about SIMHASH_BLOCK_PAIRS candidates. `.search(xq, k)` is faiss's: (sims, ids), -1 / -inf padded.
    """

    def __init__(self, xb: np.ndarray, lambda_: float, target: float, bits: int = 0, seed: int = 0):
        from scipy.stats import binom

        faiss = _faiss()
        p = float(np.arccos(np.clip(lambda_, -1.0, 1.0)) / np.pi)
        bits = bits or simhash_bits(len(xb), p, target)
        self.xb = xb
        self.planes = np.random.default_rng(seed).standard_normal((xb.shape[1], bits), dtype=np.float32)
        self.radius = int(binom.ppf(target, bits, p))
        self.codes = faiss.IndexBinaryFlat(bits)
        for s in range(0, len(xb), CHECK_BLOCK):
            self.codes.add(self._encode(xb[s:s + CHECK_BLOCK]))
        self.stats = {"index": "simhash", "simhash_bits": bits, "simhash_radius": self.radius,
                      "est_recall_at_lambda": round(float(binom.cdf(self.radius, bits, p)), 4),
                      "simhash_candidates": 0}

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(x @ self.planes > 0, axis=1)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nq = len(xq)
        D = np.full((nq, k), -np.inf, np.float32)
        I = np.full((nq, k), -1, np.int64)
        s, step = 0, 1024
        while s < nq:
            q = xq[s:s + step]
            # faiss keeps distances < radius: +1 for ≤
            lims, _, ids = self.codes.range_search(self._encode(q), self.radius + 1)
            lims = lims.astype(np.int64)
            src = np.repeat(np.arange(len(q)), np.diff(lims))
            sims = np.empty(len(ids), np.float32)
            for e in range(0, len(ids), 1 << 15):              # exact cosines, 32k gathered pairs at a time
                sl = slice(e, e + (1 << 15))
                sims[sl] = np.einsum("ij,ij->i", q[src[sl]], self.xb[ids[sl]])
            order = np.lexsort((ids, -sims, src))              # per query: best first, ties by id
            src, sims, ids = src[order], sims[order], ids[order]
            rank = np.arange(len(ids)) - lims[src]
            top = rank < k
            D[s + src[top], rank[top]] = sims[top]
            I[s + src[top], rank[top]] = ids[top]
            self.stats["simhash_candidates"] += int(len(ids))
            s += len(q)
            step = int(np.clip(SIMHASH_BLOCK_PAIRS * len(q) / max(len(ids), 1), 1, 65_536))
        return D, I


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
