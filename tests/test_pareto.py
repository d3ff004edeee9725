"""Worst-first Pareto ranking: hand cases, edge cases, property tests against the O(N²) peel."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pas.curate.pareto import worst_first_ranks
from tests.helpers import brute_force_ranks


def test_hand_computed_three_objectives():
    pts = np.array([
        [1.0, 1.0, 1.0],    # A: no row is worse than A -> front 0
        [0.0, 0.0, 0.0],    # B: below C -> front 3
        [1.0, 1.0, 1.0],    # A again: duplicates share a front
        [2.0, 0.0, 0.0],    # D: nothing has a higher first score -> front 0 (B is below D too)
        [0.5, 0.5, 0.5],    # C: below E (equal third score, lower in two) -> front 2
        [1.0, 1.0, 0.5],    # E: below A (equal in two, lower in one) -> front 1
    ])
    assert worst_first_ranks(pts).tolist() == [0, 3, 0, 0, 2, 1]


def test_hand_computed_two_and_one_objectives():
    pts2 = np.array([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    assert worst_first_ranks(pts2).tolist() == [0, 0, 0, 1, 2, 1]
    pts1 = np.array([[0.2], [0.9], [0.2], [0.5]])
    assert worst_first_ranks(pts1).tolist() == [2, 0, 2, 1]


def test_empty_single_and_all_equal():
    assert worst_first_ranks(np.zeros((0, 3))).shape == (0,)
    assert worst_first_ranks(np.array([[0.3, 0.1, 0.2]])).tolist() == [0]
    assert worst_first_ranks(np.full((50, 3), 0.7)).tolist() == [0] * 50


def test_signed_zero_rows_are_duplicates():
    pts = np.array([[0.0, 1.0, 1.0], [-0.0, 1.0, 1.0], [-0.0, 0.5, 1.0]])
    assert worst_first_ranks(pts).tolist() == [0, 0, 1]


def test_integer_input_and_dtype():
    r = worst_first_ranks(np.array([[1, 2, 3], [0, 2, 3]]))
    assert r.dtype == np.int64 and r.tolist() == [0, 1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(bad):
    pts = np.array([[0.1, 0.2, 0.3], [0.4, bad, 0.6]])
    with pytest.raises(ValueError, match=r"finite.*row 1"):
        worst_first_ranks(pts)


def test_bad_shapes_refused():
    with pytest.raises(ValueError, match="2-D"):
        worst_first_ranks(np.zeros(5))
    with pytest.raises(ValueError, match="1 to 3 objectives"):
        worst_first_ranks(np.zeros((5, 4)))


def _check_front_invariants(pts: np.ndarray, r: np.ndarray) -> None:
    """Every front-k row (k > 0) has a worse row in front k-1; no row has a worse row in its front."""
    worse = (pts[:, None, :] >= pts[None, :, :]).all(-1) & (pts[:, None, :] > pts[None, :, :]).any(-1)
    for j in range(len(pts)):
        dominators = r[worse[:, j]]
        assert not (dominators == r[j]).any()
        if r[j] > 0:
            assert (dominators == r[j] - 1).any()


rows = st.integers(min_value=0, max_value=60)


@st.composite
def score_arrays(draw):
    n = draw(rows)
    d = draw(st.sampled_from([2, 3]))
    levels = draw(st.sampled_from([2, 3, 5, 1000]))       # few levels -> heavy ties
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pts = np.round(rng.random((n, d)) * (levels - 1)) / (levels - 1)
    if n and draw(st.booleans()):                            # duplicate some rows
        pts = np.vstack([pts, pts[rng.integers(0, n, size=draw(st.integers(1, 20)))]])
        pts = pts[rng.permutation(len(pts))]
    return pts


@settings(max_examples=300, deadline=None)
@given(score_arrays())
def test_matches_brute_force_peel(pts):
    r = worst_first_ranks(pts)
    assert r.tolist() == brute_force_ranks(pts).tolist()
    for method in ("sweep", "grid"):                        # both exact algorithms, whatever auto picks
        assert worst_first_ranks(pts, method=method).tolist() == r.tolist()
    if len(pts):
        assert set(r.tolist()) == set(range(r.max() + 1))
        # identical rows share a front
        _, inv = np.unique(pts, axis=0, return_inverse=True)
        for g in np.unique(inv):
            assert len(set(r[inv.ravel() == g].tolist())) == 1


@settings(max_examples=40, deadline=None)
@given(score_arrays())
def test_front_invariants(pts):
    _check_front_invariants(pts, worst_first_ranks(pts))


@pytest.mark.parametrize("shape", ["uniform", "correlated", "rounded"])
def test_matches_moocore_on_thousands(shape):
    """Larger inputs (long tie runs exercise the multikey sort's partition path) vs moocore."""
    moocore = pytest.importorskip("moocore")
    rng = np.random.default_rng(7)
    n = 4000
    pts = {"uniform": lambda: rng.random((n, 3)),
           "correlated": lambda: rng.random((n, 1)) + 0.05 * rng.standard_normal((n, 3)),
           "rounded": lambda: np.round(rng.random((n, 3)), 1)}[shape]()
    ref = np.asarray(moocore.pareto_rank(pts, maximise=True))
    ref2 = np.asarray(moocore.pareto_rank(pts[:, :2], maximise=True))
    methods = ["auto", "sweep"] + (["grid"] if shape == "rounded" else [])   # grid: 4000^3 cells otherwise
    for method in methods:
        assert (worst_first_ranks(pts, method=method) == ref).all(), method
        assert (worst_first_ranks(pts[:, :2], method=method) == ref2).all(), method


def test_order_invariance():
    rng = np.random.default_rng(3)
    pts = np.round(rng.random((500, 3)), 1)
    perm = rng.permutation(500)
    assert (worst_first_ranks(pts)[perm] == worst_first_ranks(pts[perm])).all()


def test_auto_picks_the_grid_only_for_small_grids(monkeypatch):
    import pas.curate.pareto as P

    calls = []
    real = P._ranks_grid

    def spy(*args):
        calls.append(args[3:])
        return real(*args)

    monkeypatch.setattr(P, "_ranks_grid", spy)
    rng = np.random.default_rng(5)
    rounded = np.round(rng.random((20_000, 3)), 1)              # 11^3 cells
    assert (worst_first_ranks(rounded) == worst_first_ranks(rounded, method="sweep")).all()
    assert calls == [(11, 11, 11)]
    worst_first_ranks(rng.random((20_000, 3)))                  # continuous: the sample rules it out
    assert len(calls) == 1
    with pytest.raises(ValueError, match="method"):
        worst_first_ranks(rounded, method="fast")
    with pytest.raises(ValueError, match="cells exceed"):
        worst_first_ranks(rng.random((300, 3)), method="grid")  # 301^3 > 2^24


@settings(max_examples=150, deadline=None)
@given(score_arrays(), st.integers(0, 3), st.integers(1, 6), st.booleans(), st.integers(0, 3))
def test_sweep_buffers_and_fallback_paths(pts, max_summary_fronts, n_cuts, tiny_pool, coarse_shift):
    """The sweep kernel with tiny starting buffers (every growth path resumes mid-sweep) and few or no
    summarised fronts (past them: the coarse summary, whole staircases and a binary search over fronts)
    still equals the brute-force peel."""
    from pas.curate import pareto as P

    if len(pts) < 2 or pts.shape[1] != 3:
        return
    order, s = P._descending_lex_order(pts)
    cuts = np.unique(np.quantile(s[1], np.linspace(0, 1, n_cuts + 2)[1:-1]))
    got = P._ranks3_sorted(s[0], s[1], s[2], cuts, max_summary_fronts, fine_bins=8, front_slots=1,
                           pool_slots=1 if tiny_pool else None, coarse_shift=coarse_shift)
    ranks = np.empty(len(pts), np.int64)
    ranks[order] = got
    assert ranks.tolist() == brute_force_ranks(pts).tolist()


def test_cmov_option_is_set_only_on_x86_and_restored(monkeypatch):
    import platform

    import llvmlite.binding as llvm

    from pas.curate import pareto as P

    calls = []
    monkeypatch.setattr(llvm, "set_option", lambda name, opt: calls.append(opt))
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with P._no_cmov_conversion():
        pass
    assert calls == []                                   # the option exists only for x86 targets
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(RuntimeError):
        with P._no_cmov_conversion():
            raise RuntimeError("compile failed")
    assert calls == ["--x86-cmov-converter=false", "--x86-cmov-converter=true"]   # restored on error too


@pytest.mark.parametrize("max_summary_fronts", [0, 5, 10_000])
def test_many_tied_fronts_like_the_ood_scores(max_summary_fronts):
    """The scale benchmark's score shape: B' = B + noise clipped to [0, 1] and 80% of blur deltas
    exactly 0, so the rows with B' = 1 (or 0) and delta 0 form one chain of one-row fronts (F grows
    with N) and tie in y: many undecided fronts per row, past the walk limit (the binary search over
    cells) and past the summaries (the coarse summary). Equal to the brute-force peel."""
    from pas.curate import pareto as P

    rng = np.random.default_rng(11)
    n = 1500
    base = rng.random(n)
    pts = np.column_stack([base, np.clip(base + 0.1 * rng.standard_normal(n), 0, 1),
                           np.where(rng.random(n) < 0.2, 0.2 * rng.standard_normal(n), 0.0)])
    ref = brute_force_ranks(pts)
    assert ref.max() + 1 > 100                              # the chains: far more fronts than buckets
    order, s = P._descending_lex_order(pts)
    cuts = np.unique(np.quantile(s[1], np.linspace(0, 1, 17)[1:-1]))
    for coarse_shift in (0, 2):
        got = P._ranks3_sorted(s[0], s[1], s[2], cuts, max_summary_fronts, coarse_shift=coarse_shift)
        ranks = np.empty(n, np.int64)
        ranks[order] = got
        assert (ranks == ref).all()
    assert (worst_first_ranks(pts) == ref).all()
