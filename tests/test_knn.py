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
    # random 32-d data: no cluster structure, the near-λ pairs need more than 20% of the lists, so the
    # Hamming scan; with dense λ-edges (every pair, as a random-init SSCD gives) exact search
    assert info["index"] == "simhash" and info["ivf_nprobe"] > 0.2 * info["nlist"] and "nprobe" not in info
    assert info["simhash_candidates"] > 0
    monkeypatch.setattr(dd, "AUTO_SIMHASH_MAX_EDGES", 0.0)
    info = {}
    sims, ids = knn_self(x, 8, index="auto", nprobe=0, lambda_=0.6, use_gpu=False, info=info)
    assert info["index"] == "flat"
    e_sims, e_ids = knn_self(x, 8, index="flat", use_gpu=False)
    np.testing.assert_array_equal(ids, e_ids)


# ------------------------------------------------------------------------------------------ SimHash

def _hamming(ca, cb):
    return np.unpackbits(ca[:, None, :] ^ cb[None, :, :], axis=2).sum(2)


def test_simhash_search_is_the_exact_top_k_of_the_rows_within_the_radius(monkeypatch):
    """Against brute force: candidates are exactly the rows within Hamming radius r (≤, faiss keeps < r+1),
    ranked by exact cosine, ties by id, -1 / -inf padded; the same whatever the query block size."""
    import pas.knn as kk

    x, _, _ = _planted(n=600, d=24, pairs=60, seed=4)
    x[5] = x[7]                                                       # an exact tie
    idx = kk.SimHashIndex(x, 0.6, 0.995, bits=64, seed=1)
    codes = idx._encode(x)
    ham = _hamming(codes, codes)
    assert idx.stats["simhash_radius"] == idx.radius and np.diag(ham).max() == 0
    g = x @ x.T
    k = len(x)                                                        # every candidate: the set is exact
    D, I = idx.search(x, k)
    assert (ham == idx.radius).any()                                  # the boundary is exercised
    for i in range(len(x)):
        cand = np.flatnonzero(ham[i] <= idx.radius)
        got = I[i][I[i] >= 0]
        assert sorted(got.tolist()) == cand.tolist(), i
        np.testing.assert_allclose(D[i][: len(got)], g[i, got], atol=1e-6)
        assert (np.diff(D[i][: len(got)]) <= 0).all()                 # best first
        assert np.isneginf(D[i][len(got):]).all() and (I[i][len(got):] == -1).all()
    assert I[5][:2].tolist() == [5, 7] and I[7][:2].tolist() == [5, 7]   # a tie goes to the lower id
    D10, I10 = idx.search(x, 10)
    np.testing.assert_array_equal(I10, I[:, :10])
    monkeypatch.setattr(kk, "SIMHASH_BLOCK_PAIRS", 50)                  # blocks of a query or two
    D2, I2 = kk.SimHashIndex(x, 0.6, 0.995, bits=64, seed=1).search(x, 10)
    np.testing.assert_array_equal(I2, I10)
    np.testing.assert_array_equal(D2, D10)


def test_simhash_radius_gives_the_binomial_recall_at_lambda():
    """Charikar: a pair at angle θ differs in each random-hyperplane bit with probability θ/π, so the
    share of pairs at cos λ within the radius is the Binomial CDF that set it (est_recall_at_lambda)."""
    from scipy.stats import binom

    from pas.knn import SimHashIndex

    rng = np.random.default_rng(0)
    m, d, lam = 4000, 64, 0.6
    x = rng.standard_normal((m, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    u = rng.standard_normal((m, d)).astype(np.float32)
    u -= (u * x).sum(1, keepdims=True) * x
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    y = lam * x + np.sqrt(1 - lam ** 2) * u                          # every pair at cos exactly λ
    idx = SimHashIndex(x, lam, 0.9, bits=128, seed=2)
    p = np.arccos(lam) / np.pi                                       # 0.2952
    assert idx.radius == int(binom.ppf(0.9, 128, p))
    assert idx.stats["est_recall_at_lambda"] >= 0.9
    h = np.unpackbits(idx._encode(x) ^ idx._encode(y), axis=1).sum(1)
    assert abs(h.mean() - 128 * p) < 0.3                             # E = bits·θ/π
    assert abs((h <= idx.radius).mean() - binom.cdf(idx.radius, 128, p)) < 0.015


def test_simhash_finds_the_near_threshold_pairs_in_every_band():
    x, a, b = _planted()
    g = x @ x.T
    np.fill_diagonal(g, -1)
    ei, ej = np.nonzero(np.triu(g > np.float32(0.6)))
    ecos = g[ei, ej]
    info = {}
    sims, ids = knn_self(x, 16, index="simhash", lambda_=0.6, use_gpu=False, info=info)
    assert info["index"] == "simhash" and 0 < info["simhash_candidates"] < len(x) ** 2 / 4
    ok = _edge_found(sims, ids, ei, ej)
    for lo in np.arange(0.6, 0.95, 0.05):
        m = (ecos > lo) & (ecos <= lo + 0.05)
        assert m.sum() >= 20 and ok[m].mean() >= 0.99, (lo, ok[m].mean())
    hit = sims > np.float32(0.6)                                      # no false edges: exact cosines
    got = {(min(i, j), max(i, j)) for i, j in zip(np.nonzero(hit)[0], ids[hit])}
    assert got <= set(zip(ei.tolist(), ej.tolist()))
    again = knn_self(x, 16, index="simhash", lambda_=0.6, use_gpu=False)
    np.testing.assert_array_equal(again[1], ids)
    with pytest.raises(ValueError, match="lambda_"):
        knn_self(x, 8, index="simhash", use_gpu=False)


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



def test_simhash_bits_are_the_fewest_that_keep_unrelated_candidates_few():
    from scipy.stats import binom

    from pas.knn import SIMHASH_MAX_FALSE, simhash_bits

    p = np.arccos(0.6) / np.pi
    false = lambda n, b: n * binom.cdf(binom.ppf(0.995, b, p), b, 0.5)      # unrelated rows per query
    for n, want in ((1000, 128), (100_000, 256), (1_000_000, 320)):
        b = simhash_bits(n, p, 0.995)
        assert b == want and false(n, b) <= SIMHASH_MAX_FALSE < false(n, b - 64)
    assert simhash_bits(10 ** 6, np.arccos(0.9) / np.pi, 0.995) < simhash_bits(10 ** 6, p, 0.995)  # λ far from 0
