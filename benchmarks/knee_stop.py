"""Benchmark: where the kneedle stop lands on the per-front peel curve (paper) vs the binned curve.

Paper §3.3: kneedle on "a curve that represents the relationship between the average value of each
metric at the i-th Pareto-front (Y-axis) and the cumulative number of images removed up to that point
(X-axis)". `prune.knee_bins: 0` is that curve; `knee_bins: 50` first merges the fronts into 50 bins of
about equal image count. Same scores, same Pareto ranking (`worst_first_ranks`), same kneedle (S = 1,
interp1d); only the curve differs. Score shapes (3 OOD scores per image):
  uniform     i.i.d. U(0, 1)                                          (~100 large fronts at 100k)
  correlated  base ~ U(0, 1) + N(0, 0.05) per score                   (many small fronts)
  ood_tail    90% Beta(2, 8) in-domain + 10% Beta(8, 2) out-of-domain (the case pruning is for)
  rounded     U(0, 1) rounded to 2 decimals                           (ties)
Smoke-sized rows (N = 300) show what binning does to the offline smoke run (≈300 images, ≈40 fronts).

    PYTHONPATH=src python benchmarks/knee_stop.py --out benchmarks/RESULTS-knee.md
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from pas.curate.knee import front_curve, knee_stop
from pas.curate.pareto import worst_first_ranks
from pareto import make as pareto_make   # benchmarks/pareto.py, beside this script

SHAPES = ("uniform", "correlated", "ood_tail", "rounded")
NAMES = ("ood_b", "ood_bprime", "ood_blur_delta")


def make(shape: str, n: int, seed: int) -> np.ndarray:
    """benchmarks/pareto.py's score sets, plus `ood_tail`: 10% of the images clearly out of domain."""
    if shape != "ood_tail":
        return pareto_make(shape, n, seed)
    rng = np.random.default_rng(seed)
    v = rng.beta(2, 8, (n, 3))
    ood = rng.random(n) < 0.1
    v[ood] = rng.beta(8, 2, (int(ood.sum()), 3))
    return v


def row(shape: str, n: int, seed: int, bins: int) -> dict:
    v = make(shape, n, seed)
    t0 = time.perf_counter()
    nk, x, Y = front_curve(worst_first_ranks(v), v)
    per_front = knee_stop(nk, x, Y, NAMES, bins=0)
    binned = knee_stop(nk, x, Y, NAMES, bins=bins)
    return {"shape": shape, "N": n, "seed": seed, "fronts": len(nk),
            "front": per_front, "binned": binned, "seconds": time.perf_counter() - t0}


def knees(res: dict) -> str:
    return " / ".join("-" if k.x is None else f"{k.x:,}" for k in res["knees"].values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bins", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    worst_first_ranks(np.random.default_rng(0).random((100, 3)))     # numba warm-up, not timed
    rows = [row(s, n, seed, a.bins) for n in a.sizes for s in SHAPES for seed in range(a.seeds)]
    lines = [f"| N | shape | seed | fronts | stop per-front (% N) | stop binned={a.bins} (% N) | "
             "|Δ| (% N) | knees per-front (B / B′ / blur) | knees binned | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, b, N = r["front"]["stop_x"], r["binned"]["stop_x"], r["N"]
        lines.append(f"| {N:,} | {r['shape']} | {r['seed']} | {r['fronts']} | {f:,} ({100 * f / N:.1f}) | "
                     f"{b:,} ({100 * b / N:.1f}) | {100 * abs(f - b) / N:.1f} | {knees(r['front'])} | "
                     f"{knees(r['binned'])} | {r['seconds']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(f"<!-- {platform.machine()}, {time.strftime('%Y-%m-%d')}: "
                     f"python benchmarks/knee_stop.py --sizes {' '.join(map(str, a.sizes))} "
                     f"--seeds {a.seeds} --bins {a.bins} -->\n{text}\n")


if __name__ == "__main__":
    main()
