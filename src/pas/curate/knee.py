"""Kneedle stop for the Pareto peel (paper §3.3).

Paper: kneedle "identifies the 'knee' point on a curve that represents the relationship between the
average value of each metric at the i-th Pareto-front (Y-axis) and the cumulative number of images
removed up to that point (X-axis). By selecting the maximum X value among the three knees (one per
metric), we can estimate the most efficient halt point."

Per metric m and front k (0 = removed first): x_k = images removed through front k, y_k = mean of m
over front k; `kneed.KneeLocator(x, y, curve="convex", direction="decreasing")`.

The default (`bins` = 0) is that per-front curve, as written. Dense noisy curves (thousands of small
fronts) can make kneedle report a spurious knee at the first noise wiggle (kneedle's offline mode
returns the first local maximum of its difference curve that is followed by a drop below its
threshold). Two options, both params:
- `bins`: group consecutive fronts into `bins` bins holding about the same number of images
  (x_k in equal-width slices of [0, N]); a bin's x is the x of its last front (a front boundary, so
  the stop still removes whole fronts) and its y the image-weighted mean of its fronts. 0 = no binning.
  Not the paper's curve: on 100k synthetic score sets binning to 50 moves the stop far
  (benchmarks/RESULTS-knee.md).
- `interp`: kneed's "interp1d" (default) or "polynomial" (a degree-`degree` polynomial fit).
x is passed to kneed divided by N (kneedle is invariant to scaling x; polyfit on raw counts is
ill-conditioned).

Degenerate curves: fewer than 3 points after binning ("too_few_points"), constant y ("flat") or no
knee found ("no_knee") give no knee for that metric. The stop is the max x over the metrics that have
a knee; if none has one, nothing is removed and the reason is "no_knee".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Knee:
    """Kneedle result for one metric: `x` images removed at the knee (None if none), and why."""

    x: int | None
    y: float | None
    reason: str                 # "knee" | "too_few_points" | "flat" | "no_knee"


def front_curve(ranks: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peel curve of a ranking: (n_k images per front, x_k cumulative removed, Y[k, m] front means).

    `ranks` (N,) front per image (0..F-1, every front non-empty); `values` (N, M) metrics.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if len(ranks) != len(values):
        raise ValueError(f"{len(ranks)} ranks for {len(values)} rows of values")
    if len(ranks) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, values.shape[1]))
    n_fronts = int(ranks.max()) + 1
    n = np.bincount(ranks, minlength=n_fronts)
    if (n == 0).any():
        raise ValueError("ranks must number fronts 0..F-1 without gaps")
    sums = np.stack([np.bincount(ranks, weights=values[:, m], minlength=n_fronts)
                     for m in range(values.shape[1])], axis=1)
    return n, np.cumsum(n), sums / n[:, None]


def bin_curve(n: np.ndarray, x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive fronts into ≤ `bins` bins of ~equal image count (see module docstring).

    Returns (x_b, y_b): x of each non-empty bin's last front and the image-weighted mean y of its fronts
    (`y` may be (F,) or (F, M)). `bins` = 0 returns the curve unchanged.
    """
    n, x, y = np.asarray(n), np.asarray(x), np.asarray(y, dtype=np.float64)
    if bins == 0 or len(x) == 0:
        return x.copy(), y.copy()
    total = x[-1]
    b = np.clip(np.ceil(bins * x / total).astype(np.int64) - 1, 0, bins - 1)
    w = np.bincount(b, weights=n, minlength=bins)
    keep = w > 0
    cols = y[:, None] if y.ndim == 1 else y
    y_b = np.stack([np.bincount(b, weights=n * cols[:, m], minlength=bins)[keep] / w[keep]
                    for m in range(cols.shape[1])], axis=1)
    # b is non-decreasing in k, so the last front of each bin is where b changes
    last = np.flatnonzero(np.r_[b[1:] != b[:-1], True])
    return x[last], (y_b[:, 0] if y.ndim == 1 else y_b)


def find_knee(x: np.ndarray, y: np.ndarray, *, S: float = 1.0, interp: str = "interp1d",
              degree: int = 7) -> Knee:
    """kneedle (convex, decreasing) on one curve; the knee is one of the given x values."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return Knee(None, None, "too_few_points")
    if np.ptp(y) == 0:
        return Knee(None, None, "flat")
    from kneed import KneeLocator

    xn = x / x[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # kneed warns "No knee/elbow found"; reported as reason
        kl = KneeLocator(xn, y, S=S, curve="convex", direction="decreasing",
                         interp_method=interp, polynomial_degree=degree)
    if kl.knee is None:
        return Knee(None, None, "no_knee")
    i = int(np.argmin(np.abs(xn - kl.knee)))
    return Knee(int(round(x[i])), float(y[i]), "knee")


def knee_stop(n: np.ndarray, x: np.ndarray, Y: np.ndarray, names: list[str] | tuple[str, ...], *,
              bins: int = 0, S: float = 1.0, interp: str = "interp1d", degree: int = 7) -> dict:
    """The paper's stop: kneedle per metric (per-front curve; binned if `bins`), then the max x over the knees.

    Returns {"knees": {name: Knee}, "stop_x": images to remove (0 if no knee), "fronts": number of
    whole fronts removed (x_k <= stop_x), "reason": "knee" | "no_knee"}.
    """
    knees = {}
    for m, name in enumerate(names):
        xb, yb = bin_curve(n, x, Y[:, m], bins)
        knees[name] = find_knee(xb, yb, S=S, interp=interp, degree=degree)
    found = [k.x for k in knees.values() if k.x is not None]
    if not found:
        return {"knees": knees, "stop_x": 0, "fronts": 0, "reason": "no_knee"}
    stop_x = max(found)
    fronts = int(np.searchsorted(x, stop_x, side="right"))   # knees sit on front boundaries
    return {"knees": knees, "stop_x": int(x[fronts - 1]) if fronts else 0, "fronts": fronts,
            "reason": "knee"}
