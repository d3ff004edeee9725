"""Worst-first Pareto ranking of the three OOD scores (paper §3.3, "Pareto Front-based Removal").

Paper: "an image I is considered less suitable than the image J (and therefore prioritized for removal)
if it shows higher OOD scores across the metrics [...] with at least one metric showing a strict
increase." Peeling the set of images that no other image is worse than, again and again, is one
non-dominated sorting of the scores under *maximisation*: front 0 is peeled first.

Two exact algorithms, chosen per input by `worst_first_ranks(method="auto")`:

Sweep (any scores; three objectives: one sort, then per row a pass over the fronts' summaries and
one or two searches in staircases of a few points, plus amortised insertions): rows are visited in
descending lexicographic order, so every row that dominates p is visited before p and identical rows
are adjacent. The front of p is 1 + the highest front holding a dominator of p. "Front k holds a
dominator of p" is monotone in k (a dominator in front k is itself dominated by a member of every
earlier front), so those fronts are a prefix. y is cut into 128 buckets; per front, a summary (the
largest z at or above each bucket) answers "surely yes" / "surely no" for most fronts, and the sure-yes
fronts are counted in one vectorised pass. The rest (about half a front per row) is settled by the
front's cell for p's bucket: the 2-D staircase of the (y, z) maxima of its members in that bucket
(all have x ≥ p.x), one front after another; after CELL_WALK_MAX of them, a binary search over the
undecided fronts (ties in y, e.g. scores clipped to 1, put many fronts in one bucket). Past the
summarised fronts (score sets whose fronts grow with N), a coarse summary (16 buckets, 136 bytes a
front) narrows the fronts to search the same way before the whole-front staircases decide. Identical
rows share a front: a run of duplicates is ranked once, before any of it is inserted. Sorting is one argsort of the first column plus a multikey quicksort inside runs of
tied values.

Grid (heavily tied scores, e.g. rounded or quantised): dynamic programming over the grid of distinct
values, O(grid cells) and no sort; used when the grid has at most 16 cells per row.
"""

from __future__ import annotations

import contextlib

import numpy as np
from numba import njit

__all__ = ["worst_first_ranks"]


SUMMARY_COUNT_MAX = 512     # up to this many fronts, count the sure ones linearly (vectorised)
MAX_SUMMARY_CELLS = 1 << 20  # summary + cells for at most ~8k fronts (32 MB); more fronts: whole staircases
COARSE_SHIFT = 3            # past those, a summary of 2^3 buckets merged into one (17 values per front)
CELL_WALK_MAX = 8           # undecided fronts checked one by one before a binary search over them


@contextlib.contextmanager
def _no_cmov_conversion():
    """LLVM's x86 cmov-converter pass turns the selects of the sweep's branch-free binary searches back
    into branches, which the CPU mispredicts about half the time (benchmarks/RESULTS-pareto.md). The option only matters while numba compiles, so it is turned
    off for that and restored after (numba caches the machine code on disk). x86 only: other targets
    do not have the option."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        yield
        return
    import llvmlite.binding as llvm

    llvm.set_option("", "--x86-cmov-converter=false")
    try:
        yield
    finally:
        llvm.set_option("", "--x86-cmov-converter=true")


@njit(cache=True, inline="always")
def _lower_bound(sy, o, m, py):
    """First index in sy[o : o + m] (ascending) whose value is >= py, or o + m: a branch-free binary
    search (the select compiles to cmov; unsigned indices skip numba's negative-index wraparound)."""
    a, w = o, m
    while w > 1:
        half = w >> 1
        a += half * (sy[np.uint64(a + half - 1)] < py)
        w -= half
    if w == 1:
        a += sy[np.uint64(a)] < py
    return a


@njit(cache=True, inline="always")
def _prefix_end(z, row, lo, w, off, pz):
    """lo + the length of the prefix of fronts lo … lo + w − 1 whose summary z[row, front − off] is
    >= pz: a binary search, valid because those fronts form a prefix. Takes the 2-D summary and a row
    index, not a row view, so no reference counting enters the sweep."""
    while w > 0:
        half = w >> 1
        if z[row, np.uint64(lo + half - off)] >= pz:
            lo += half + 1
            w -= half + 1
        else:
            w = half
    return lo


@njit(cache=True)
def _ranks3_run(xs, ys, zs, y0, yscale, table, i0, max_summary_fronts, cshift, ranks, zT, zC, sy, sz, boff,
                bcap, bsize, state):
    """The sweep of `_ranks3_sorted` from row i0 on, with fixed-size buffers: returns the row at which
    a buffer is full (before touching any state for that row, so the caller grows it and resumes
    there), or n when done. state = [used, n_fronts, need]; need: 1 = block slots / summary columns,
    2 = staircase pool (state[3] = slots required), 3 = coarse summary columns.

    The buffers are arguments and never reassigned or sliced here: numba then keeps reference counting
    out of the loop (a reassigned array or a row view costs an atomic incref/decref per use:
    benchmarks/RESULTS-pareto.md). Indices are unsigned where they can be: signed ones make numba emit
    negative-index wraparound code on every access, and keep the staircase moves from vectorising.
    """
    n = xs.shape[0]
    nb = zT.shape[0] - 1                    # y buckets
    msf = max_summary_fronts
    used, n_fronts = state[0], state[1]
    for i in range(i0, n):
        px, py, pz = xs[i], ys[i], zs[i]
        if i > 0 and xs[i - 1] == px and ys[i - 1] == py and zs[i - 1] == pz:
            ranks[i] = ranks[i - 1]         # duplicate row: same front, staircases unchanged
            continue
        f = int((py - y0) * yscale)          # y bucket: a fine equal-width bin, then the table
        bp = table[np.uint64(min(max(f, 0), table.shape[0] - 1))]
        b0, b1 = np.uint64(bp), np.uint64(bp + 1)
        # Fronts k < lo surely hold a dominator of p: zT[b + 1, k] >= pz (a member with a larger y and
        # z). The column is non-increasing in k, so they are a prefix and lo is a count: one
        # vectorised pass with no branch to mispredict (a binary search with many fronts).
        n_sum = min(n_fronts, msf)
        if n_sum <= SUMMARY_COUNT_MAX:
            lo = 0
            for k in range(n_sum):
                lo += zT[b1, np.uint64(k)] >= pz
        else:
            lo, w = 0, n_sum
            while w > 1:
                half = w >> 1
                lo += half * (zT[b1, np.uint64(lo + half - 1)] >= pz)
                w -= half
            if w == 1:
                lo += zT[b1, np.uint64(lo)] >= pz
        # From lo on, zT[b, k] < pz says surely not; otherwise a member in p's own bucket may decide,
        # and only those are in the front's cell for the bucket (~0.5 cells per row). The first front
        # holding no dominator is p's front.
        hi = n_fronts
        known, known_at = -1, 0             # a front whose cell position of py is known
        steps = 0
        while lo < n_sum and zT[b0, np.uint64(lo)] >= pz:
            if steps == CELL_WALK_MAX:
                # many undecided fronts (ties in y put them all in p's bucket): "holds a dominator" is
                # monotone in k, so binary search [lo, top) with the cells; top = first surely-not front
                top = _prefix_end(zT, b0, lo, n_sum - lo, 0, pz)
                while lo < top:
                    mid = (lo + top) >> 1
                    blk = np.uint64(mid * nb + bp)
                    o, m = boff[blk], bsize[blk]
                    a = _lower_bound(sy, o, m, py)
                    if a < o + m and sz[np.uint64(a)] >= pz:
                        lo = mid + 1
                    else:
                        top = mid
                if lo < n_sum:
                    hi = lo
                break
            steps += 1
            blk = np.uint64(lo * nb + bp)
            o, m = boff[blk], bsize[blk]
            a = _lower_bound(sy, o, m, py)
            if a < o + m and sz[np.uint64(a)] >= pz:
                lo += 1
            else:
                hi = lo
                known, known_at = lo, a
                break
        if lo >= n_sum and hi > lo:         # fronts without a fine summary
            # the coarse summary zC (buckets of 2^cshift fine ones) narrows [lo, hi) as zT does: fronts
            # surely holding a dominator are a prefix, surely holding none a suffix
            cp = np.uint64(bp >> cshift)
            lo = _prefix_end(zC, cp + np.uint64(1), lo, hi - lo, msf, pz)
            hi = _prefix_end(zC, cp, lo, hi - lo, msf, pz)   # the rest: binary search, whole staircases
            while lo < hi:
                mid = (lo + hi) >> 1
                blk = np.uint64(msf * nb + mid - msf)
                o, m = boff[blk], bsize[blk]
                a = _lower_bound(sy, o, m, py)
                if a < o + m and sz[np.uint64(a)] >= pz:
                    lo = mid + 1
                else:
                    hi = mid
        r = lo
        if r == n_fronts:                   # a new front: room for its blocks and summary column?
            need = (r + 1) * nb if r < msf else msf * nb + r + 1 - msf
            if need > boff.shape[0] or (r < msf and r == zT.shape[1]):
                state[0], state[1], state[2] = used, n_fronts, 1
                return i
            if r >= msf and r - msf == zC.shape[1]:
                state[0], state[1], state[2] = used, n_fronts, 3
                return i
        # insert p into its block: the cell (r, bucket) or, past the summaries, r's whole staircase
        blk = np.uint64(r * nb + bp) if r < msf else np.uint64(msf * nb + r - msf)
        o, m, c_r = boff[blk], bsize[blk], bcap[blk]    # a new front's blocks are all empty
        a = known_at if r == known else _lower_bound(sy, o, m, py)
        j = a - o                           # j == m or sz[o + j] < pz: p is not dominated
        end = j + 1 if (j < m and sy[np.uint64(o + j)] == py) else j
        start = j                           # entries p weakly dominates: [start, end)
        while start > 0 and sz[np.uint64(o + start - 1)] <= pz:
            start -= 1
        shift = 1 - (end - start)           # new size = m + shift
        newcap = 0
        if m + shift > c_r:                 # (re)allocate the block at the end of the pool
            newcap = 2 * c_r if c_r else (4 if r < msf else 8)
            if used + newcap > sy.shape[0]:
                state[0], state[1], state[2], state[3] = used, n_fronts, 2, used + newcap
                return i
        # from here on, row i changes state
        ranks[i] = r
        if r == n_fronts:
            n_fronts += 1
        if newcap:
            for k in range(m):
                sy[np.uint64(used + k)] = sy[np.uint64(o + k)]
                sz[np.uint64(used + k)] = sz[np.uint64(o + k)]
            boff[blk], bcap[blk] = used, newcap
            o = used
            used += newcap
        if shift > 0:                       # shift == 1: move the tail right, back to front
            top = o + m - 1
            for t in range(m - end):
                k = np.uint64(top - t)
                sy[k + np.uint64(1)] = sy[k]
                sz[k + np.uint64(1)] = sz[k]
        elif shift < 0:                     # move the tail left
            d = np.uint64(-shift)
            for k in range(np.uint64(o + end), np.uint64(o + m)):
                sy[k - d] = sy[k]
                sz[k - d] = sz[k]
        sy[np.uint64(o + start)] = py
        sz[np.uint64(o + start)] = pz
        bsize[blk] = m + shift
        if r < msf:                         # zT[b, r] is non-increasing in b
            b, col = bp, np.uint64(r)
            while b >= 0 and zT[np.uint64(b), col] < pz:
                zT[np.uint64(b), col] = pz
                b -= 1
        else:                               # so is zC[c, r - msf]
            b, col = bp >> cshift, np.uint64(r - msf)
            while b >= 0 and zC[np.uint64(b), col] < pz:
                zC[np.uint64(b), col] = pz
                b -= 1
    state[0], state[1], state[2] = used, n_fronts, 0
    return n


def _run_without_cmov_conversion(*args):
    """`_ranks3_run(*args)`, compiled (or loaded from numba's cache) with LLVM's cmov-converter off."""
    if not _ranks3_run.signatures:
        with _no_cmov_conversion():
            return _ranks3_run(*args)
    return _ranks3_run(*args)


def _ranks3_sorted(xs, ys, zs, cuts, max_summary_fronts, fine_bins=4096, front_slots=64, pool_slots=None,
                   coarse_shift=COARSE_SHIFT):
    """Fronts of rows already in descending lexicographic order (xs, ys, zs contiguous).

    cuts: sorted y values cutting y into len(cuts) + 1 buckets. A row's bucket is looked up in O(1): its
    equal-width fine bin (of `fine_bins` over [min y, max y]) indexes a table of the number of cuts <=
    the bin's lower edge. Any bucketing that is monotone in y keeps the result exact (equal y, equal
    bucket); the cuts only decide how well the summaries work.

    For each of the first `max_summary_fronts` fronts k (the rest keep one whole staircase per front
    and a coarse summary zC, the same table over buckets of 2^coarse_shift buckets, which bounds the
    binary search over their fronts):
    - summary zT[b, k] = the largest z inserted into front k with a y bucket >= b. For p in bucket b,
      zT[b + 1, k] >= pz -> front k surely holds a dominator (its y is in a higher bucket, so > py);
      zT[b, k] < pz -> surely not. Stored bucket-major: one bucket's values over the fronts are
      contiguous, counted in one vectorised pass.
    - cell (k, b) = the 2-D staircase of the (y, z) maxima of front k's members in bucket b, which
      decides the rest: a dominator of p in front k has y >= py, so it is either in a higher bucket
      (the summary) or in p's bucket (the cell). Cells hold ~3 points where a whole-front staircase
      held ~50, so searching and inserting touch one or two cache lines.
    Staircases (cells and whole fronts) are blocks of one pool sy/sz: block id k * nb + b for cells,
    msf * nb + (k - msf) past the summaries; boff/bcap/bsize give each block's slice, y strictly
    ascending and z strictly descending. Buffers start small (front_slots fronts, pool_slots points)
    and double when `_ranks3_run` stops for room.
    """
    n = xs.shape[0]
    ranks = np.empty(n, np.int64)
    n_buckets = cuts.shape[0] + 1
    y0, y1 = float(ys.min()), float(ys.max())
    yscale = fine_bins / (y1 - y0) if y1 > y0 else 0.0
    edges = y0 + np.arange(fine_bins) / yscale if yscale else np.full(1, y0)
    table = np.searchsorted(cuts, edges, side="right").astype(np.int64)   # non-decreasing
    zT = np.full((n_buckets + 1, front_slots), -np.inf)
    zC = np.full((((n_buckets - 1) >> coarse_shift) + 2, front_slots), -np.inf)
    sy = np.empty(max(4096, n) if pool_slots is None else pool_slots, np.float64)
    sz = np.empty_like(sy)
    boff, bcap, bsize = (np.zeros(front_slots * n_buckets, np.int64) for _ in range(3))
    state = np.zeros(4, np.int64)
    i = 0
    while True:
        i = _run_without_cmov_conversion(xs, ys, zs, y0, yscale, table, i, max_summary_fronts, coarse_shift,
                                         ranks, zT, zC, sy, sz, boff, bcap, bsize, state)
        if i == n:
            return ranks
        if state[2] == 1:                   # more fronts: block slots (empty) and summary columns
            boff, bcap, bsize = (np.pad(a, (0, a.shape[0])) for a in (boff, bcap, bsize))
            if zT.shape[1] < max_summary_fronts and zT.shape[1] <= state[1]:
                zT = np.pad(zT, ((0, 0), (0, zT.shape[1])), constant_values=-np.inf)
        elif state[2] == 3:                 # more coarse summary columns
            zC = np.pad(zC, ((0, 0), (0, zC.shape[1])), constant_values=-np.inf)
        else:                               # a larger staircase pool
            grow = max(2 * sy.shape[0], int(state[3])) - sy.shape[0]
            sy, sz = (np.pad(a, (0, grow), mode="empty") for a in (sy, sz))


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


@njit(cache=True)
def _gather_columns(a, order):
    """(d, N) columns of the rows of `a` (N, d) in `order`, with -0.0 made +0.0 (equal values must look
    identical). One pass over whole rows: each row's d values share a cache line."""
    n, d = a.shape
    out = np.empty((d, n), np.float64)
    for i in range(n):
        r = order[i]
        for k in range(d):
            out[k, i] = a[r, k] + 0.0
    return out


def _descending_lex_order(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row order by the first column descending, ties by the next columns descending, and the columns
    (d, N) gathered in that order.

    One quicksort on the first column, then only runs of tied values are sorted further (multikey
    quicksort on contiguous gathered columns): continuous scores cost one argsort, far less than
    np.lexsort. Few temporaries: fresh memory costs page faults (benchmarks/RESULTS-pareto.md).
    """
    order = np.argsort(-a[:, 0], kind="quicksort")
    cs = _gather_columns(a, order)                  # columns in x order
    xs = cs[0]
    if a.shape[1] > 1 and (xs[1:] == xs[:-1]).any():
        pos = np.arange(len(order))
        _break_ties(pos, xs, cs)
        order = order[pos]
        cs = _gather_columns(np.ascontiguousarray(cs.T), pos)
    return order, cs


GRID_MAX_CELLS = 1 << 24        # grid path: at most 64 MB of int32 cells
GRID_CELLS_PER_ROW = 16         # ...and at most this many cells per row (the DP costs ~2-3 ns per cell,
#                                 the sweep ~150 ns per row)


@njit(cache=True)
def _ranks_grid(cx, cy, cz, gx, gy, gz):
    """Fronts by dynamic programming over the grid of distinct values (exact; for heavily tied scores).

    Codes are dense ranks per column (ascending values). M[i, j, k] = the highest front among occupied
    cells in the box [i:, j:, k:] (-1: none). The rows strictly worse than cell (i, j, k) lie in the
    union of the boxes at (i+1, j, k), (i, j+1, k), (i, j, k+1), so the cell's front is one more than
    the largest of those three, and M of an occupied cell is its own front. O(cells), no sort.
    """
    n = cx.shape[0]
    m = np.zeros((gx + 1, gy + 1, gz + 1), np.int32)
    m[gx, :, :] = -1
    m[:, gy, :] = -1
    m[:, :, gz] = -1
    for p in range(n):
        m[cx[p], cy[p], cz[p]] = 1                 # occupied (read once, before the cell is computed)
    t = np.empty(gz, np.int32)
    for i in range(gx - 1, -1, -1):
        for j in range(gy - 1, -1, -1):
            a, b, row = m[i + 1, j], m[i, j + 1], m[i, j]
            for k in range(gz):                     # the two neighbours along i and j: vectorised
                t[k] = max(a[k], b[k])
            run = -1                                # then the suffix along k, one cell at a time
            for k in range(gz - 1, -1, -1):
                best = max(t[k], run)
                run = best + 1 if row[k] == 1 else best
                row[k] = run
    ranks = np.empty(n, np.int64)
    for p in range(n):
        ranks[p] = m[cx[p], cy[p], cz[p]]
    return ranks


def _grid_ranks(a: np.ndarray, force: bool = False) -> np.ndarray | None:
    """Ranks by `_ranks_grid` when the distinct values make a small enough grid, else None.

    A sample of rows rules continuous scores out cheaply (its distinct values bound the grid from
    below); otherwise every column is coded by np.unique and the grid size checked exactly.
    """
    n, d = a.shape
    budget = min(GRID_MAX_CELLS, GRID_CELLS_PER_ROW * n)
    if not force and n > 4096:
        sample = a[:: n // 2048]
        if np.prod([float(len(np.unique(sample[:, c]))) for c in range(d)]) > budget:
            return None
    coded = [np.unique(a[:, c], return_inverse=True) for c in range(d)]   # -0.0 == +0.0: one code
    dims = [len(u) for u, _ in coded] + [1] * (3 - d)
    cells = float(np.prod([g + 1.0 for g in dims]))
    if cells > (GRID_MAX_CELLS if force else budget):
        if force:
            raise ValueError(f"method='grid': {cells:.0f} cells exceed {GRID_MAX_CELLS}")
        return None
    codes = [np.asarray(inv.reshape(-1), np.int64) for _, inv in coded] + [np.zeros(n, np.int64)] * (3 - d)
    return _ranks_grid(codes[0], codes[1], codes[2], dims[0], dims[1], dims[2])


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


def worst_first_ranks(scores: np.ndarray, method: str = "auto") -> np.ndarray:
    """Front index of every row under maximisation; 0 = the worst front, removed first.

    Row i is worse than row j if scores[i] >= scores[j] in every column and > in one. Rows no other
    row is worse than form front 0; removing them, the next such rows form front 1, and so on.
    Identical rows always share a front. Accepts 1, 2 or 3 objectives; NaN or inf raise ValueError.

    `method`: "sweep" (one sort, then a sweep with a staircase per front), "grid" (dynamic programming
    over the grid of distinct values: no sort, O(grid cells); for heavily tied scores) or "auto" (grid
    when it has at most 16 cells per row and 2^24 in all, else sweep). All are exact and agree.

    >>> worst_first_ranks(np.array([[1., 1., 1.], [0., 0., 0.], [1., 1., 1.], [2., 0., 0.]]))
    array([0, 1, 0, 0])
    """
    if method not in ("auto", "sweep", "grid"):
        raise ValueError(f"method={method!r}: expected auto, sweep or grid")
    a = _check(scores)
    n, d = a.shape
    if n == 0:
        return np.zeros(0, np.int64)
    if n == 1:
        return np.zeros(1, np.int64)
    if d == 1:
        a = np.column_stack([a[:, 0], np.zeros(n)])
        d = 2
    if method != "sweep":
        ranks = _grid_ranks(a, force=method == "grid")
        if ranks is not None:
            return ranks
    order, s = _descending_lex_order(a)     # s: (d, N) columns, visited in order (-0.0 made +0.0)
    ranks = np.empty(n, np.int64)
    if d == 2:
        ranks[order] = _ranks2_sorted(s[0], s[1])
    else:
        # y buckets of ~equal size, cut at quantiles of a subsample: any cuts keep it exact
        n_buckets = 128
        sample = np.sort(s[1][:: max(1, n // (16 * n_buckets))])
        cuts = np.unique(sample[(np.arange(1, n_buckets) * len(sample)) // n_buckets])
        ranks[order] = _ranks3_sorted(s[0], s[1], s[2], cuts, MAX_SUMMARY_CELLS // (n_buckets + 1))
    return ranks
