"""Benchmark: dedup of N clustered 512-d descriptors with planted duplicate groups, k = 64.

Compares, on the same seeded data:
  faiss-flat   our pipeline: pas.curate.dedup (exact faiss IndexFlatIP kNN + scipy csgraph components)
  faiss-ivf    the same with the IVF index at the shipped defaults (`dedup.index: ivf`: 4·sqrt(n) lists,
               8-bit codes + exact float32 re-rank, nprobe 8)
  faiss-ivf-flat  IVF with float32 lists (`dedup.ivf_codes: flat`), nprobe 8
  faiss-ivf-np4 / faiss-ivf-np16  the default IVF at nprobe 4 / 16 (the recall margin)
  faiss-hnsw   HNSW (M 32, efSearch 128)
  sklearn      scikit-learn NearestNeighbors(brute, n_jobs=-1) kNN + the same λ-graph + csgraph components
Each method runs in its own subprocess, so peak RSS (ru_maxrss) is its own; the parent prints a table
and the ratio against sklearn. Recall = planted groups whose members all landed in one component;
"= exact" = the method's components are exactly faiss-flat's (the partition, not just the counts).
--copy-noise 0.7 plants harder copies (cos ≈ 0.67 between two copies, just above λ = 0.6).

    python benchmarks/dedup.py --n 100000                  # all methods
    python benchmarks/dedup.py --n 20000 --methods sklearn faiss-flat
    python benchmarks/dedup.py --n 100000 --copy-noise 0.7
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

D, K, LAMBDA = 512, 64, 0.6


def make_data(n: int, seed: int = 0, n_clusters: int = 500, group_frac: float = 0.1, copy_noise: float = 0.33):
    """Clustered unit vectors (within-cluster cos ≈ 0.2, below λ) plus planted groups of 2–6 near
    copies (copy_noise 0.33: cos ≈ 0.9 to their original; 0.7: ≈ 0.8, and ≈ 0.67 between two copies,
    just above λ). Returns (x float32 (n, D), group id per row or -1)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, D)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    n_copies_target = int(n * group_frac)
    sizes = []
    while sum(sizes) < n_copies_target:
        sizes.append(int(rng.integers(2, 7)))
    n_base = n - sum(s - 1 for s in sizes)
    base = centers[rng.integers(0, n_clusters, n_base)] * 0.5 + rng.standard_normal((n_base, D)).astype(np.float32) / np.sqrt(D)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    group = np.full(n, -1, np.int64)
    rows = [base]
    originals = rng.choice(n_base, len(sizes), replace=False)
    for g, (o, s) in enumerate(zip(originals, sizes)):
        group[o] = g
        cp = base[o] + copy_noise * rng.standard_normal((s - 1, D)).astype(np.float32) / np.sqrt(D)
        rows.append(cp / np.linalg.norm(cp, axis=1, keepdims=True))
    x = np.concatenate(rows).astype(np.float32)
    group[n_base:] = np.repeat(np.arange(len(sizes)), [s - 1 for s in sizes])
    perm = rng.permutation(n)
    return np.ascontiguousarray(x[perm]), group[perm]


def run_method(method: str, n: int, seed: int, data: str) -> dict:
    import pandas as pd  # noqa: F401  (import cost outside the timed region)

    from pas.curate.dedup import dedup, dedup_from_knn

    # made once by the parent; .npy files load with one copy, so the child's RSS high-water mark
    # before the method is imports + data, and any rise above it is the method's own memory
    x, group = np.load(f"{data}/x.npy"), np.load(f"{data}/group.npy")
    keys = [f"k{i:07d}" for i in range(n)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "faiss-flat":
        m = dedup(keys, x, LAMBDA, K, seed, index="flat", use_gpu=False)
    elif method == "faiss-ivf":
        m = dedup(keys, x, LAMBDA, K, seed, index="ivf", use_gpu=False)       # library defaults
    elif method == "faiss-ivf-flat":
        m = dedup(keys, x, LAMBDA, K, seed, index="ivf", ivf_codes="flat", nprobe=8, use_gpu=False)
    elif method in ("faiss-ivf-np4", "faiss-ivf-np16"):
        m = dedup(keys, x, LAMBDA, K, seed, index="ivf", nprobe=int(method[len("faiss-ivf-np"):]),
                  use_gpu=False)
    elif method == "faiss-hnsw":
        m = dedup(keys, x, LAMBDA, K, seed, index="hnsw", use_gpu=False)
    elif method == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=K + 1, algorithm="brute", metric="euclidean", n_jobs=-1).fit(x)
        dist, ids = nn.kneighbors(x)
        sims = (1.0 - dist.astype(np.float32) ** 2 / 2.0)   # unit vectors: cos = 1 − d²/2
        self_hit = ids == np.arange(n)[:, None]
        drop = self_hit.copy()
        drop[~self_hit.any(1), -1] = True
        sims, ids = sims[~drop].reshape(n, K), ids[~drop].reshape(n, K)
        m = dedup_from_knn(keys, sims, ids, LAMBDA, seed)
    else:
        raise SystemExit(f"unknown method {method}")
    dt = time.perf_counter() - t0
    comp = m["component"].to_numpy()
    np.save(f"{data}/{method}.comp.npy", comp)
    planted = group >= 0
    df = {"g": group[planted], "c": comp[planted]}

    per_group = pd.DataFrame(df).groupby("g")["c"].nunique()
    recall = float((per_group == 1).mean())
    removed = ~m["kept"].to_numpy()
    # a removal is correct when the image belongs to a planted group (one per group is kept)
    precision = float(planted[removed].mean()) if removed.any() else 1.0
    return {"method": method, "n": n, "seconds": round(dt, 2), "recall_groups": round(recall, 4),
            "removal_precision": round(precision, 4), "removed": int(removed.sum()),
            "planted_removable": int(planted.sum() - per_group.size),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_mb": round(rss0 / 1024, 1)}


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Do two component labellings group the rows identically (labels may differ)?"""
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["faiss-flat", "faiss-ivf", "faiss-ivf-flat", "faiss-ivf-np4",
                                                     "faiss-ivf-np16", "faiss-hnsw", "sklearn"])
    ap.add_argument("--copy-noise", type=float, default=0.33)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--make-data", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_data:
        x, group = make_data(args.n, args.seed, copy_noise=args.copy_noise)
        np.save(f"{args.data}/x.npy", x)
        np.save(f"{args.data}/group.npy", group)
        return 0
    if args.one:
        print(json.dumps(run_method(args.one, args.n, args.seed, args.data)))
        return 0
    import tempfile

    # data are made in a child too: Linux children inherit the parent's RSS high-water mark at fork,
    # so the parent must stay small for the children's ru_maxrss to mean anything
    tmp = tempfile.TemporaryDirectory()
    data = tmp.name
    subprocess.run([sys.executable, __file__, "--n", str(args.n), "--seed", str(args.seed), "--make-data",
                    "--copy-noise", str(args.copy_noise), "--data", data], check=True)
    import faiss
    import sklearn
    import threadpoolctl

    print(f"# n={args.n} d={D} k={K} lambda={LAMBDA} copy_noise={args.copy_noise}; faiss {faiss.__version__} (omp threads "
          f"{faiss.omp_get_max_threads()}), sklearn {sklearn.__version__}; "
          f"blas {[i.get('internal_api') for i in threadpoolctl.threadpool_info()]}", flush=True)
    results = []
    for method in args.methods:
        r = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--seed", str(args.seed), "--one", method,
                            "--data", data], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{method}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res), flush=True)
    base = next((r for r in results if r["method"] == "sklearn"), None)
    exact = np.load(f"{data}/faiss-flat.comp.npy") if any(r["method"] == "faiss-flat" for r in results) else None
    print("\n| method | n | seconds | × vs sklearn | = exact | group recall | removal precision | removed | "
          "peak RSS MB | RSS before (data+imports) MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{base['seconds'] / r['seconds']:.1f}" if base else "-"
        same = "-" if exact is None else same_partition(exact, np.load(f"{data}/{r['method']}.comp.npy"))
        print(f"| {r['method']} | {r['n']} | {r['seconds']} | {ratio} | {same} | {r['recall_groups']} | "
              f"{r['removal_precision']} | {r['removed']} | {r['peak_rss_mb']} | {r['rss_before_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
