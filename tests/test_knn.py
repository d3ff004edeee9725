"""kNN (pas.knn): descriptor checks, IVF with exact re-rank, calibrated nprobe, the GPU wrapping."""

from __future__ import annotations

import numpy as np
import pytest

from pas.knn import knn_self


# ------------------------------------------------------------------------------- descriptors

def _check_whole(x, name="descriptors", atol=1e-3):
    """check_descriptors as it was before row blocks: whole-array isfinite and norm."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x):
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or inf")
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > atol)
        if len(bad):
            raise ValueError(f"{name}: row {bad[0]} has norm {norms[bad[0]]:.4f}; descriptors must be "
                             "L2-normalised (SSCD outputs are)")
    return x


def _outcome(fn, x):
    try:
        return fn(x).tobytes()
    except ValueError as e:
        return str(e)


def test_check_descriptors_blocks_same_verdict_bounded_memory(monkeypatch):
    import tracemalloc

    import pas.knn as dd

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nan_late, bad_early = x.copy(), x.copy()
    nan_late[900, 3] = np.nan
    bad_early[5] *= 1.1                      # a norm error before a NaN in a later block
    bad_early[990, 0] = np.inf
    bad_late, off = x.copy(), x.copy()
    bad_late[777] *= 0.5
    off[::2] *= 1.0005                       # within atol: accepted
    monkeypatch.setattr(dd, "CHECK_BLOCK", 64)
    for case in (x, nan_late, bad_early, bad_late, off, x[:0], x[:1]):
        assert _outcome(dd.check_descriptors, case) == _outcome(_check_whole, case)
    # the blocks bound the temporaries: no N × D copy (32 MB here) while checking
    monkeypatch.setattr(dd, "CHECK_BLOCK", 65_536)
    big = np.tile(x, (500, 1))               # 500k × 16 float32
    tracemalloc.start()
    dd.check_descriptors(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < big.nbytes / 4


# ---------------------------------------------------------------------------------- IVF 8-bit codes

def test_ivf_sq8_returns_exact_similarities():
    # 8-bit codes only pick the candidates; the similarities the λ test sees are re-ranked in float32
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, ids = knn_self(x, 10, index="ivf", nprobe=4, ivf_codes="sq8", use_gpu=False)
    assert (ids >= 0).all()
    exact = np.einsum("nd,nkd->nk", x, x[ids])
    np.testing.assert_allclose(sims, exact, rtol=0, atol=2e-6)
    assert (np.diff(sims, axis=1) <= 1e-6).all()          # still sorted best first
    # and the candidates are the exact top-k for nearly every query (random data, nprobe 4 of 219)
    e_sims, e_ids = knn_self(x, 10, index="flat", use_gpu=False)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, e_ids)])
    assert overlap > 0.3
    with pytest.raises(ValueError, match="ivf_codes"):
        knn_self(x, 10, index="ivf", ivf_codes="pq", use_gpu=False)


# ------------------------------------------------------------------------- calibrated IVF nprobe

def _circle(deg) -> np.ndarray:
    t = np.deg2rad(np.asarray(deg, np.float64))
    return np.stack([np.cos(t), np.sin(t)], 1).astype(np.float32)


def test_probe_ranks_hand_checked_and_as_faiss_scans():
    # 8 centroids every 45°; a at 20° is in list 0° (20° away; 45° is 25° away), b at 68° in list 90°
    # (22° vs 23°), cos(a, b) = cos 48° = 0.669 > λ 0.6. a's centroids by angle: 0°, 45°, 315°, 90° →
    # b's list is the 4th; b's: 90°, 45°, 135°, 0° → a's is the 4th too: the edge needs nprobe 4.
    # c at 200°, d at 201° (cos 0.9998): the same list, nprobe 1.
    from pas.knn import calibrate_nprobe, probe_ranks

    cents = _circle(np.arange(8) * 45)
    xb = _circle([20, 68, 200, 201])
    sims, need = probe_ranks(xb, cents, 0.6, np.array([0, 2]))
    np.testing.assert_allclose(sims, [np.cos(np.deg2rad(48)), np.cos(np.deg2rad(1))], rtol=1e-6)
    assert need.tolist() == [4, 1]
    # faiss agrees: an IVF over these centroids finds b from a at nprobe 4, not 3
    import faiss

    q = faiss.IndexFlatIP(2)
    q.add(cents)
    ivf = faiss.IndexIVFFlat(q, 2, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.add(xb)
    for nprobe, want in ((3, False), (4, True)):
        ivf.nprobe = nprobe
        D, I = ivf.search(xb[:1], 4)
        assert (1 in I[0]) is want
    # fewer than CALIB_MIN_EDGES edges in every band: pooled, quantile 4, × 1.25 → 5
    p, st = calibrate_nprobe(xb, cents, 0.6, 0.995, 4)
    assert p == 5 and st["calib_edges"] == 4 and st["est_recall"] == 1.0
    # no edge in (λ, λ + 0.05]: a–b is at 0.669
    assert st["calib_edges_near"] == 0 and st["est_recall_near"] is None


def _planted(n=3000, d=32, pairs=300, seed=0):
    """Random unit vectors + planted pairs with cosine uniform over λ+0.01 … 0.95 (exact by construction)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ends = rng.choice(n, 2 * pairs, replace=False)
    a, b = ends[:pairs], ends[pairs:]
    c = rng.uniform(0.61, 0.95, pairs)
    u = rng.standard_normal((pairs, d))
    u -= (u * x[a]).sum(1, keepdims=True) * x[a]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    y = c[:, None] * x[a] + np.sqrt(1 - c[:, None] ** 2) * u
    x[b] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x, a, b


def _edge_found(sims, ids, a, b, lam=0.6):
    hit = sims > np.float32(lam)
    return ((ids[a] == b[:, None]) & hit[a]).any(1) | ((ids[b] == a[:, None]) & hit[b]).any(1)


def test_calibrated_nprobe_finds_the_near_threshold_pairs_a_constant_one_misses():
    x, a, b = _planted()
    cos = (x[a] * x[b]).sum(1)
    # brute force: every λ-edge of the data (the planted ones and any chance ones)
    g = x @ x.T
    np.fill_diagonal(g, -1)
    ei, ej = np.nonzero(np.triu(g > np.float32(0.6)))
    ecos = g[ei, ej]
    fixed = knn_self(x, 16, index="ivf", nprobe=1, use_gpu=False)
    assert not _edge_found(*fixed, a, b)[cos < 0.65].all()          # nprobe 1 loses near-λ pairs
    info = {}
    sims, ids = knn_self(x, 16, index="ivf", nprobe=0, lambda_=0.6, calib_queries=1000, use_gpu=False,
                         info=info)
    assert 1 < info["nprobe"] < info["nlist"] and info["calib_queries"] == 1000
    ok = _edge_found(sims, ids, ei, ej)
    for lo in np.arange(0.6, 0.95, 0.05):                            # recall ≥ target in every band
        m = (ecos > lo) & (ecos <= lo + 0.05)
        assert m.sum() >= 20 and ok[m].mean() >= 0.99, (lo, ok[m].mean())
    # what it finds is exact: its edges are brute force's
    hit = sims > np.float32(0.6)
    got = {(min(i, j), max(i, j)) for i, j in zip(np.nonzero(hit)[0], ids[hit])}
    assert got <= set(zip(ei.tolist(), ej.tolist()))


def test_auto_falls_back_to_exact_when_calibration_needs_most_lists(monkeypatch):
    import pas.knn as dd

    x, a, b = _planted(n=2000, pairs=200, seed=2)
    monkeypatch.setattr(dd, "AUTO_FLAT_MAX", 1000)                 # 2000 rows count as "large"
    info = {}
    sims, ids = knn_self(x, 8, index="auto", nprobe=0, lambda_=0.6, use_gpu=False, info=info)
    # random 32-d data: no cluster structure, the near-λ pairs need more than 20% of the lists
    assert info["index"] == "flat" and info["ivf_nprobe"] > 0.2 * info["nlist"] and "nprobe" not in info
    e_sims, e_ids = knn_self(x, 8, index="flat", use_gpu=False)
    np.testing.assert_array_equal(ids, e_ids)


def test_calibrated_nprobe_is_deterministic_and_thread_independent():
    import faiss

    x, _, _ = _planted(n=2000, pairs=200, seed=1)
    runs = []
    threads = faiss.omp_get_max_threads()
    try:
        for t in (threads, threads, 1):
            faiss.omp_set_num_threads(t)
            info = {}
            runs.append((*knn_self(x, 8, index="ivf", nprobe=0, lambda_=0.6, seed=3, calib_queries=500,
                                   use_gpu=False, info=info), info))
    finally:
        faiss.omp_set_num_threads(threads)
    for sims, ids, info in runs[1:]:
        np.testing.assert_array_equal(ids, runs[0][1])
        np.testing.assert_array_equal(sims, runs[0][0])
        assert info == runs[0][2]
    with pytest.raises(ValueError, match="lambda_"):
        knn_self(x, 8, index="ivf", nprobe=0, use_gpu=False)


# ---------------------------------------------------------------------------------------------- GPU

def test_gpu_wrapping_keeps_resources_on_a_real_faiss_index():
    # faiss ≥ 1.12 refuses unknown attributes on its objects; the GPU path must keep its resources
    # alive through `referenced_objects`. No GPU here: a stand-in module returns a real CPU index.
    import types

    import faiss

    from pas.knn import _to_gpu

    res = object()
    fake = types.SimpleNamespace(StandardGpuResources=lambda: res,
                                 index_cpu_to_gpu=lambda r, dev, index: faiss.IndexFlatIP(8))
    idx = _to_gpu(fake, faiss.IndexFlatIP(8))
    assert res in idx.referenced_objects

