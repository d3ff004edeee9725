"""Worst-first Pareto ranking of the three OOD scores (paper §3.3, "Pareto Front-based Removal").

Paper: "an image I is considered less suitable than the image J (and therefore prioritized for removal)
if it shows higher OOD scores across the metrics [...] with at least one metric showing a strict
increase." Peeling the set of images that no other image is worse than, again and again, is one
non-dominated sorting of the scores under *maximisation*: front 0 is peeled first.

Algorithm (exact; three objectives: one sort, then O(log F · log S) per row for F fronts and
staircases of S points, plus amortised staircase insertions): rows are visited in descending lexicographic order, so every row that dominates p is visited before p
and identical rows are adjacent. The front of p is 1 + the highest front holding a dominator of p.
"Front k holds a dominator of p" is monotone in k (a dominator in front k is itself dominated by a
member of every earlier front), so the front of p is found by binary search over fronts. Each front
keeps the 2-D staircase of the (y, z) maxima of its members visited so far (all have x ≥ p.x), and
"front k holds a dominator of p" is one binary search in that staircase. Most of those searches are
skipped by a per-front summary over 64 y-buckets (the largest z inserted at or above each bucket),
which answers "surely yes" / "surely no" from one contiguous row. Identical rows share a front: a run
of duplicates is ranked once, before any of it is inserted. Sorting is one argsort of the first
column plus a multikey quicksort inside runs of tied values.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["worst_first_ranks", "brute_force_ranks"]


@njit(cache=True)
def _ranks3_sorted(xs, ys, zs, bk, n_buckets, max_summary_fronts):
    """Fronts of rows already in descending lexicographic order (xs, ys, zs contiguous).

    bk[i]: bucket of ys[i] (monotone in y: equal y, equal bucket). Summary zmax[b, k] = the largest z
    ever inserted into front k with a y bucket >= b, so for p in bucket b:
    zmax[b + 1, k] >= pz -> front k surely holds a dominator (its y is in a higher bucket, so > py);
    zmax[b, k] < pz -> surely not; otherwise the staircase decides. Most probes then cost two
    loads from one L1-resident row instead of a binary search (fronts >= max_summary_fronts skip it).
    """
    n = xs.shape[0]
    ranks = np.empty(n, np.int64)
    zmax = np.full((n_buckets + 1, 64), -np.inf)
    # all staircases live in one pool: front k owns sy/sz[off[k] : off[k] + cap[k]], size[k] used,
    # (y, z) maxima of its members visited so far, y strictly ascending and z strictly descending
    sy = np.empty(1024, np.float64)
    sz = np.empty(1024, np.float64)
    used = 0
    off = np.empty(64, np.int64)
    cap = np.empty(64, np.int64)
    size = np.empty(64, np.int64)
    n_fronts = 0
    for i in range(n):
        px, py, pz = xs[i], ys[i], zs[i]
        if i > 0 and xs[i - 1] == px and ys[i - 1] == py and zs[i - 1] == pz:
            ranks[i] = ranks[i - 1]         # duplicate row: same front, staircases unchanged
            continue
        bp = bk[i]
        # binary search for the first front holding no dominator of p
        lo, hi = 0, n_fronts
        while lo < hi:
            mid = (lo + hi) >> 1
            if mid < max_summary_fronts:
                if zmax[bp + 1, mid] >= pz:
                    lo = mid + 1
                    continue
                if zmax[bp, mid] < pz:
                    hi = mid
                    continue
            o, m = off[mid], size[mid]
            a, w = o, m                     # branch-free lower bound of py in sy[o : o + m]
            while w > 1:
                half = w >> 1
                a += half * (sy[a + half - 1] < py)
                w -= half
            if w == 1:
                a += sy[a] < py
            if a < o + m and sz[a] >= pz:
                lo = mid + 1
            else:
                hi = mid
        r = lo
        ranks[i] = r
        if r == n_fronts:                   # open a new front with an empty staircase
            if r == off.shape[0]:
                off = np.concatenate((off, np.empty(r, np.int64)))
                cap = np.concatenate((cap, np.empty(r, np.int64)))
                size = np.concatenate((size, np.empty(r, np.int64)))
            if used + 8 > sy.shape[0]:
                sy = np.concatenate((sy, np.empty(sy.shape[0], np.float64)))
                sz = np.concatenate((sz, np.empty(sz.shape[0], np.float64)))
            if r < max_summary_fronts and r == zmax.shape[1]:
                grown = np.full((n_buckets + 1, 2 * r), -np.inf)
                grown[:, :r] = zmax
                zmax = grown
            off[r], cap[r], size[r] = used, 8, 0
            used += 8
            n_fronts += 1
        o, m = off[r], size[r]
        a, b = o, o + m
        while a < b:
            c = (a + b) >> 1
            if sy[c] < py:
                a = c + 1
            else:
                b = c
        j = a - o                           # j == m or sz[o + j] < pz: p is not dominated
        end = j + 1 if (j < m and sy[o + j] == py) else j
        start = j                           # entries p weakly dominates: [start, end)
        while start > 0 and sz[o + start - 1] <= pz:
            start -= 1
        shift = 1 - (end - start)           # new size = m + shift
        if m + shift > cap[r]:              # move this staircase to a twice larger block
            newcap = 2 * cap[r]
            while used + newcap > sy.shape[0]:
                sy = np.concatenate((sy, np.empty(sy.shape[0], np.float64)))
                sz = np.concatenate((sz, np.empty(sz.shape[0], np.float64)))
            for k in range(m):
                sy[used + k] = sy[o + k]
                sz[used + k] = sz[o + k]
            off[r], cap[r] = used, newcap
            o = used
            used += newcap
        if shift > 0:                       # move the tail right, back to front
            for k in range(o + m - 1, o + end - 1, -1):
                sy[k + shift] = sy[k]
                sz[k + shift] = sz[k]
        elif shift < 0:                     # move the tail left
            for k in range(o + end, o + m):
                sy[k + shift] = sy[k]
                sz[k + shift] = sz[k]
        sy[o + start] = py
        sz[o + start] = pz
        size[r] = m + shift
        if r < max_summary_fronts:          # zmax[b, r] is non-increasing in b
            b = bp
            while b >= 0 and zmax[b, r] < pz:
                zmax[b, r] = pz
                b -= 1
    return ranks


@njit(cache=True)
def _ranks2_sorted(xs, ys):
    """Two objectives, rows in descending lexicographic order: front k only needs the largest y
    among its members visited so far (the classic O(N log F) sweep)."""
    n = xs.shape[0]
    ranks = np.empty(n, np.int64)
    best_y = np.empty(max(n, 1), np.float64)
    n_fronts = 0
    for i in range(n):
        py = ys[i]
        if i > 0 and xs[i - 1] == xs[i] and ys[i - 1] == py:
            ranks[i] = ranks[i - 1]
            continue
        lo, hi = 0, n_fronts
        while lo < hi:
            mid = (lo + hi) >> 1
            if best_y[mid] >= py:
                lo = mid + 1
            else:
                hi = mid
        ranks[i] = lo
        if lo == n_fronts:
            best_y[lo] = py
            n_fronts += 1
        elif py > best_y[lo]:
            best_y[lo] = py
    return ranks


@njit(cache=True)
def _greater_from(cols, d, i, j):
    """Is row i lexicographically greater than row j on columns d, d+1, ...?"""
    for k in range(d, cols.shape[0]):
        if cols[k, i] != cols[k, j]:
            return cols[k, i] > cols[k, j]
    return False


@njit(cache=True)
def _multikey_sort(idx, cols, lo, hi, d0):
    """Sort idx[lo:hi] by columns d0, d0+1, ... of `cols` (K, N), descending, in place.

    Multikey quicksort (Bentley & Sedgewick 1997): a 3-way partition on column d, then the equal
    block continues on column d + 1. Heavy ties (rounded scores) cost one pass per tied level.
    """
    stack = [(lo, hi, d0)]
    while len(stack) > 0:
        lo, hi, d = stack.pop()
        while hi - lo > 1 and d < cols.shape[0]:
            if hi - lo <= 16:               # insertion sort on the remaining columns
                for i in range(lo + 1, hi):
                    v = idx[i]
                    j = i
                    while j > lo and _greater_from(cols, d, v, idx[j - 1]):
                        idx[j] = idx[j - 1]
                        j -= 1
                    idx[j] = v
                break
            a, b, c = cols[d, idx[lo]], cols[d, idx[(lo + hi) >> 1]], cols[d, idx[hi - 1]]
            pivot = max(min(a, b), min(max(a, b), c))    # median of three
            lt, i, gt = lo, lo, hi
            while i < gt:                   # [lo, lt) > pivot, [lt, i) == pivot, [gt, hi) < pivot
                v = cols[d, idx[i]]
                if v > pivot:
                    idx[lt], idx[i] = idx[i], idx[lt]
                    lt += 1
                    i += 1
                elif v < pivot:
                    gt -= 1
                    idx[gt], idx[i] = idx[i], idx[gt]
                else:
                    i += 1
            stack.append((lo, lt, d))
            stack.append((gt, hi, d))
            lo, hi, d = lt, gt, d + 1


@njit(cache=True)
def _break_ties(order, xs, cols):
    """Within runs of equal xs (rows already sorted by the first column, descending), sort `order`
    by the other columns (cols[1:], descending lexicographic). In place."""
    n = xs.shape[0]
    s = 0
    while s < n:
        e = s + 1
        while e < n and xs[e] == xs[s]:
            e += 1
        if e - s > 1:
            _multikey_sort(order, cols, s, e, 1)
        s = e


def _descending_lex_order(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order by the first column descending, ties by the next columns descending, and the columns
    (d, N) gathered in that order.

    One quicksort on the first column, then only runs of tied values are sorted further (multikey
    quicksort on contiguous gathered columns): continuous scores cost one argsort (np.lexsort on
    1M x 3 is ~10x slower here).
    """
    at = np.ascontiguousarray(a.T)                  # (d, N)
    order = np.argsort(-at[0], kind="quicksort")
    cs = np.stack([np.take(c, order) for c in at])  # columns in x order
    xs = cs[0]
    if a.shape[1] > 1 and (xs[1:] == xs[:-1]).any():
        pos = np.arange(len(order))
        _break_ties(pos, xs, cs)
        order = order[pos]
        cs = np.stack([np.take(c, pos) for c in cs])
    return order, cs


def _check(scores: np.ndarray) -> np.ndarray:
    a = np.asarray(scores)
    if a.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (N, objectives), got shape {a.shape}")
    if a.shape[1] not in (1, 2, 3):
        raise ValueError(f"worst_first_ranks supports 1 to 3 objectives, got {a.shape[1]}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
            or a.dtype == bool):
        raise ValueError(f"scores must be numeric, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        kind = "NaN" if np.isnan(a[rows[0]]).any() else "inf"
        raise ValueError(f"scores must be finite: {len(rows)} row(s) hold NaN/inf "
                         f"(first: row {rows[0]} = {a[rows[0]].tolist()}, {kind})")
    return a


def worst_first_ranks(scores: np.ndarray) -> np.ndarray:
    """Front index of every row under maximisation; 0 = the worst front, removed first.

    Row i is worse than row j if scores[i] >= scores[j] in every column and > in one. Rows no other
    row is worse than form front 0; removing them, the next such rows form front 1, and so on.
    Identical rows always share a front. Accepts 1, 2 or 3 objectives; NaN or inf raise ValueError.

    >>> worst_first_ranks(np.array([[1., 1., 1.], [0., 0., 0.], [1., 1., 1.], [2., 0., 0.]]))
    array([0, 1, 0, 0])
    """
    a = _check(scores)
    n, d = a.shape
    if n == 0:
        return np.zeros(0, np.int64)
    if n == 1:
        return np.zeros(1, np.int64)
    if d == 1:
        a = np.column_stack([a[:, 0], np.zeros(n)])
        d = 2
    a = a + 0.0                             # -0.0 -> +0.0: equal values must look identical
    order, s = _descending_lex_order(a)     # s: (d, N) columns, visited in order
    ranks = np.empty(n, np.int64)
    if d == 2:
        ranks[order] = _ranks2_sorted(s[0], s[1])
    else:
        # y buckets of ~equal size, cut at quantiles of a subsample: any cuts keep it exact
        n_buckets = 64
        sample = np.sort(s[1][:: max(1, n // (16 * n_buckets))])
        cuts = np.unique(sample[(np.arange(1, n_buckets) * len(sample)) // n_buckets])
        bk = np.searchsorted(cuts, s[1], side="right").astype(np.int64)   # monotone in y
        ranks[order] = _ranks3_sorted(s[0], s[1], s[2], bk, n_buckets, (1 << 22) // (n_buckets + 1))
    return ranks


def brute_force_ranks(scores: np.ndarray) -> np.ndarray:
    """Reference O(N² · F) peel: repeatedly remove the rows no remaining row is worse than.

    For tests and benchmarks only; any number of objectives.
    """
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 2 or not np.isfinite(a).all():
        raise ValueError("scores must be a finite 2-D array")
    n = a.shape[0]
    ranks = np.full(n, -1, np.int64)
    remaining = np.arange(n)
    front = 0
    while remaining.size:
        r = a[remaining]
        ge = (r[:, None, :] >= r[None, :, :]).all(axis=2)   # (M, M): row q >= row p everywhere
        gt = (r[:, None, :] > r[None, :, :]).any(axis=2)
        dominated = (ge & gt).any(axis=0)                    # p has some q worse than it
        ranks[remaining[~dominated]] = front
        remaining = remaining[dominated]
        front += 1
    return ranks
