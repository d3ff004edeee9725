"""Benchmark: dedup λ-edge recall per cosine band, planted pairs just above λ_dup, random and clustered data.

Data (seeded): n unit vectors, random (isotropic, no cluster structure) or clustered (500 loose clusters,
within-cluster cos ≈ 0.2, below λ), with `--pairs` planted pairs whose cosine is uniform over
λ+0.01 … 0.95 (partner = c·x + sqrt(1−c²)·u, u ⟂ x random, so cos is exactly c up to float32 rounding).
Methods (all k = 64, one process, same data, timed kNN + graph + components):
  sklearn     NearestNeighbors(brute, n_jobs=-1) kNN + pas's graph/components (the anchor)
  sklearn-1pct  the anchor's kNN for the first 1% of the queries, its time × 100 (where all of it is too
              slow: brute force costs the same per query); no recall
  flat        pas dedup, `index: flat` (exact faiss)
  ivf-npN     pas dedup, `index: ivf`, fixed nprobe N (8 = the former default)
  ivf-cal     pas dedup, `index: ivf`, nprobe calibrated (`nprobe: 0`, target_recall 0.995, the default)
  simhash     pas dedup, `index: simhash` (256 sign bits, Hamming radius for 0.995 recall at λ, exact re-rank)
  auto        pas dedup, `index: auto` (calibrated ivf, or simhash when ivf would scan > 1% of the lists;
              flat at ≤ 50k rows)
Recall: of the planted pairs (exact, by construction), and of the exact λ-edges of a seeded sample of
`--sample` queries (faiss flat range search of the sample only: the ground truth at sizes where brute
force is too slow), each per 0.05 band of cosine. An edge counts as found when either end has the other
among its k results with cos > λ (the graph is symmetric).

    python benchmarks/dedup_recall.py --n 100000 --data random --methods sklearn flat ivf-np8 ivf-cal simhash
    python benchmarks/dedup_recall.py --n 1000000 --data random --methods sklearn-1pct auto
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

K, LAMBDA = 64, 0.6
BANDS = [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def make_data(n: int, d: int, kind: str, pairs: int, seed: int = 0):
    """(x float32 (n, d), planted pairs (P, 2) int64, their cosines (P,))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    if kind == "clustered":
        centers = rng.standard_normal((500, d), dtype=np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        x = x / np.sqrt(d) + 0.5 * centers[rng.integers(0, 500, n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ends = rng.choice(n, 2 * pairs, replace=False)
    a, b = ends[:pairs], ends[pairs:]
    c = rng.uniform(LAMBDA + 0.01, 0.95, pairs).astype(np.float32)
    for s in range(0, pairs, 65_536):            # chunks: (P, d) temporaries stay small
        sl = slice(s, s + 65_536)
        u = rng.standard_normal((len(a[sl]), d), dtype=np.float32)
        u -= (u * x[a[sl]]).sum(1, keepdims=True) * x[a[sl]]
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        y = c[sl, None] * x[a[sl]] + np.sqrt(1 - c[sl, None] ** 2) * u
        x[b[sl]] = y / np.linalg.norm(y, axis=1, keepdims=True)
    c = (x[a] * x[b]).sum(1)
    return x, np.stack([a, b], 1), c


def sample_edges(x: np.ndarray, n_sample: int, seed: int = 1):
    """Exact λ-edges (i, j, cos) of a seeded sample of queries i (flat range search of the sample)."""
    import faiss

    q = np.sort(np.random.default_rng(seed).choice(len(x), n_sample, replace=False))
    idx = faiss.IndexFlatIP(x.shape[1])
    idx.add(x)
    lims, sims, ids = idx.range_search(x[q], LAMBDA)
    src = q[np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))]
    keep = (sims > np.float32(LAMBDA)) & (ids != src)
    return np.stack([src[keep], ids[keep]], 1), sims[keep]


def found(edges: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> np.ndarray:
    hit = sims > np.float32(LAMBDA)
    a, b = edges[:, 0], edges[:, 1]
    return ((ids[a] == b[:, None]) & hit[a]).any(1) | ((ids[b] == a[:, None]) & hit[b]).any(1)


def by_band(ok: np.ndarray, cos: np.ndarray) -> dict:
    out = {}
    for lo, hi in zip(BANDS[:-1], BANDS[1:]):
        m = (cos > lo) & (cos <= hi)
        if m.any():
            out[f"{lo:.2f}-{hi:.2f}"] = (round(float(ok[m].mean()), 4), int(m.sum()))
    return out


def run(method: str, x: np.ndarray, seed: int):
    from pas.curate.dedup import dedup_from_knn
    from pas.knn import knn_self

    n = len(x)
    keys = [f"k{i:07d}" for i in range(n)]
    info: dict = {}
    t0 = time.perf_counter()
    if method in ("sklearn", "sklearn-1pct"):
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=K + 1, algorithm="brute", metric="euclidean", n_jobs=-1).fit(x)
        if method == "sklearn-1pct":     # the anchor's rate on 1% of the queries, its time scaled × 100
            dist, ids = nn.kneighbors(x[: max(1, n // 100)])
            dt = time.perf_counter() - t0
            info = {"seconds_measured": round(dt, 2), "queries_measured": len(ids)}
            return dt * n / len(ids), None, None, info
        dist, ids = nn.kneighbors(x)
        sims = 1.0 - dist.astype(np.float32) ** 2 / 2.0     # unit vectors: cos = 1 − d²/2
        self_hit = ids == np.arange(n)[:, None]
        drop = self_hit.copy()
        drop[~self_hit.any(1), -1] = True
        sims, ids = sims[~drop].reshape(n, K), ids[~drop].reshape(n, K)
    elif method == "flat":
        sims, ids = knn_self(x, K, index="flat", use_gpu=False)
    elif method == "ivf-cal":
        sims, ids = knn_self(x, K, index="ivf", nprobe=0, lambda_=LAMBDA, seed=seed, use_gpu=False, info=info)
    elif method in ("simhash", "auto"):
        sims, ids = knn_self(x, K, index=method, nprobe=0, lambda_=LAMBDA, seed=seed, use_gpu=False, info=info)
    elif method.startswith("ivf-np"):
        sims, ids = knn_self(x, K, index="ivf", nprobe=int(method[6:]), seed=seed, use_gpu=False, info=info)
    else:
        raise SystemExit(f"unknown method {method}")
    dedup_from_knn(keys, sims, ids, LAMBDA, seed)
    return time.perf_counter() - t0, sims, ids, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--data", choices=["random", "clustered"], default="random")
    ap.add_argument("--pairs", type=int, default=0, help="planted pairs; 0 = n/10 (a fifth of the rows)")
    ap.add_argument("--sample", type=int, default=4000, help="queries whose exact λ-edges are the ground truth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["flat", "ivf-np8", "ivf-cal"])
    args = ap.parse_args()
    import os

    import faiss

    t = time.perf_counter()
    x, planted, pc = make_data(args.n, args.d, args.data, args.pairs or args.n // 10, args.seed)
    edges, ec = sample_edges(x, args.sample)
    print(f"# n={args.n} d={args.d} data={args.data} pairs={len(planted)} sample={args.sample} "
          f"(sampled λ-edges {len(edges)}) k={K} λ={LAMBDA}; faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads); load {os.getloadavg()[0]:.2f}; data+truth "
          f"{time.perf_counter() - t:.1f}s", flush=True)
    rows = []
    for m in args.methods:
        dt, sims, ids, info = run(m, x, args.seed)
        r = {"method": m, "seconds": round(dt, 2), "load": round(os.getloadavg()[0], 2), **info}
        if sims is not None:
            r.update(planted_recall=round(float(found(planted, sims, ids).mean()), 4),
                     planted_by_band=by_band(found(planted, sims, ids), pc),
                     sample_recall=round(float(found(edges, sims, ids).mean()), 4) if len(edges) else None,
                     sample_by_band=by_band(found(edges, sims, ids), ec))
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in rows if r["method"].startswith("sklearn")), None)
    heads = [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(BANDS[:-1], BANDS[1:])]
    print("\n| method | nprobe / nlist, or radius / bits | seconds | × vs sklearn | planted recall | " + " | ".join(heads) + " |")
    print("|---|---|---|---|---|" + "---|" * len(heads))
    for r in rows:
        ratio = f"{base['seconds'] / r['seconds']:.1f}" if base else "-"
        npl = (f"{r['nprobe']} / {r['nlist']}" if "nprobe" in r else
               f"r {r['simhash_radius']} / {r['simhash_bits']} bits" if "simhash_radius" in r else "-")
        bands = [str(r.get("planted_by_band", {}).get(h, ("-",))[0]) for h in heads]
        print(f"| {r['method']} | {npl} | {r['seconds']} | {ratio} | {r.get('planted_recall', '-')} | "
              + " | ".join(bands) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
