"""Dedup: hand-built graphs, brute-force equivalence, determinism, edge cases, the stage end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.sparse.csgraph import connected_components

from pas.curate.dedup import DedupParams, dedup, dedup_from_knn, duplicate_graph, seeded_rank, summary
from pas.knn import knn_self
from pas.params import ParamsError, build
from tests.stage_helpers import load_stage, outputs


def unit(*rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def at_angle(cos: float, axis: int = 1, d: int = 4) -> np.ndarray:
    """Unit vector with cosine `cos` to e0 (exactly, in float32: x0 = cos), the rest on `axis`."""
    v = np.zeros(d, np.float32)
    v[0] = cos
    v[axis] = np.sqrt(1 - np.float32(cos) ** 2)
    return v


def keys(n: int) -> list[str]:
    return [f"k{i:03d}" for i in range(n)]


# ------------------------------------------------------------------------------ hand-built graphs

def test_chain_is_one_component():
    # a–b and b–c are duplicates (cos 0.8), a–c is not (cos 0.28): one component of three
    a = np.array([1, 0, 0], np.float32)
    b = np.array([0.8, 0.6, 0], np.float32)
    c = np.array([0.28, 0.96, 0], np.float32)
    far = np.array([0, 0, 1], np.float32)
    m = dedup(keys(4), np.stack([a, b, c, far]), lambda_dup=0.6, k_dup=3)
    assert list(m["component_size"]) == [3, 3, 3, 1]
    assert m["kept"].sum() == 2
    assert m.loc[3, "kept"] and m.loc[3, "component"] == 1
    assert len(set(m.loc[:2, "representative"])) == 1
    assert list(m["reason"]).count("duplicate") == 2


def test_asymmetric_knn_still_joins():
    # j is among i's neighbours but i is not among j's (k=1): the edge must still join them
    sims = np.array([[0.9], [0.95], [0.95]], np.float32)
    ids = np.array([[1], [2], [1]])
    adj = duplicate_graph(sims, ids, 3, 0.6)
    assert (adj != adj.T).nnz == 0
    assert adj[1, 0] and adj[0, 1]
    m = dedup_from_knn(keys(3), sims, ids, 0.6)
    assert set(m["component_size"]) == {3} and m["kept"].sum() == 1


def test_tie_exactly_at_lambda_is_not_a_duplicate():
    lam = 0.6
    x = np.stack([at_angle(1.0), at_angle(lam, 1), at_angle(np.nextafter(np.float32(lam), np.float32(1)), 2)])
    # x1·x0 == float32(0.6) exactly: not above λ; x2·x0 is one ulp above: a duplicate; x1·x2 = 0.36
    assert x[1] @ x[0] == np.float32(lam)
    m = dedup(keys(3), x, lambda_dup=lam, k_dup=2)
    comp = dict(zip(m["key"], m["component"]))
    assert comp["k000"] == comp["k002"] != comp["k001"]
    assert m["kept"].sum() == 2


def test_threshold_is_strict_in_float32_not_float64():
    # float32(0.6) > 0.6 in float64; compared naively the tie would become an edge
    sims = np.array([[np.float32(0.6)], [np.float32(0.6)]], np.float32)
    ids = np.array([[1], [0]])
    assert duplicate_graph(sims, ids, 2, 0.6).nnz == 0


def test_exact_copies_self_not_first():
    # three identical rows: faiss may return a copy before the row itself; self must still go
    x = unit([1, 2, 3], [1, 2, 3], [1, 2, 3], [3, -2, 1])
    sims, ids = knn_self(x, 2)
    assert ids.shape == (4, 2)
    assert not (ids == np.arange(4)[:, None]).any()
    m = dedup(keys(4), x, 0.6, 2)
    assert m["kept"].sum() == 2 and m.loc[m["kept"], "key"].isin(["k003"]).any()


# --------------------------------------------------------------------------- brute-force property

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_components(seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((40, 8))
    x = np.concatenate([base, base[rng.integers(0, 40, 30)] + 0.3 * rng.standard_normal((30, 8))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    n, lam = len(x), 0.8
    m = dedup(keys(n), x, lam, k_dup=n)            # k ≥ n−1: the kNN graph is the full graph
    s = x @ x.T
    adj = (s > np.float32(lam)) & ~np.eye(n, dtype=bool)
    ncomp, labels = connected_components(adj, directed=False)
    assert m["kept"].sum() == ncomp
    same = labels[:, None] == labels[None, :]
    comp = m["component"].to_numpy()
    assert ((comp[:, None] == comp[None, :]) == same).all()
    # exactly one kept per component, and it is its own representative
    kept = m[m["kept"]]
    assert kept["component"].is_unique and (kept["key"] == kept["representative"]).all()


# ------------------------------------------------------------------------------------ determinism

def test_representative_is_seeded_and_order_independent():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(16)
    x = np.stack([v + 0.01 * rng.standard_normal(16) for _ in range(12)] + [rng.standard_normal(16)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    k = [f"img{i}" for i in range(13)]
    m0 = dedup(k, x, 0.6, 64, seed=0).set_index("key").sort_index()
    perm = rng.permutation(13)
    m0p = dedup([k[i] for i in perm], x[perm], 0.6, 64, seed=0).set_index("key").sort_index()
    pd.testing.assert_frame_equal(m0, m0p)
    # the kept member is the one with the smallest seeded hash
    ranks = dict(zip(k[:12], seeded_rank(k[:12], 0)))
    assert m0.loc["img0", "representative"] == min(ranks, key=ranks.get)
    # another seed picks (over several seeds) other members: a random choice, not "first key"
    reps = {dedup(k, x, 0.6, 64, seed=s).loc[0, "representative"] for s in range(8)}
    assert len(reps) > 2


def test_component_ids_by_size_then_key():
    x = unit([1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.01], [0, 1, 0.02], [0, 0, 1])
    m = dedup(keys(6), x, 0.6, 5)
    assert list(m["component"]) == [1, 1, 0, 0, 0, 2]


# ------------------------------------------------------------------------------------ edge cases

def test_empty_input():
    m = dedup([], np.zeros((0, 512), np.float32), 0.6, 64)
    assert len(m) == 0 and list(m.columns)[:3] == ["key", "kept", "reason"]
    assert summary(m, []) == {"n_in": 0, "n_kept": 0, "dropped": {}, "by_source": {"real": {"n_in": 0, "n_kept": 0}, "synthetic": {"n_in": 0, "n_kept": 0}},
                              "components_gt1": 0, "largest_component": 0}


def test_single_image():
    m = dedup(["only"], unit([1, 2, 3]), 0.6, 64)
    assert m.to_dict("records")[0]["kept"] and m.loc[0, "component_size"] == 1
    assert m.loc[0, "representative"] == "only"


def test_duplicate_graph_same_as_repeat_version():
    from scipy import sparse

    rng = np.random.default_rng(3)
    for n, k in ((200, 8), (50, 1), (30, 0)):
        sims = rng.uniform(0.3, 0.9, (n, k)).astype(np.float32)
        ids = rng.integers(-1, n, (n, k))
        mask = (sims > np.float32(0.6)) & (ids >= 0)
        rows = np.repeat(np.arange(n), k)[mask.ravel()]          # the earlier construction
        a = sparse.coo_matrix((np.ones(len(rows), bool), (rows, ids[mask])), shape=(n, n)).tocsr()
        want = (a + a.T).astype(bool)
        got = duplicate_graph(sims, ids, n, 0.6)
        assert got.shape == want.shape and (got != want).nnz == 0


def test_bad_inputs_refused():
    with pytest.raises(ValueError, match="does not match"):
        from pas.knn import knn_search

        knn_search(unit([1, 0, 0]), unit([1, 0]), 1)
    with pytest.raises(ValueError, match="2-D"):
        dedup(["a"], np.ones(3, np.float32), 0.6)
    with pytest.raises(ValueError, match="L2-normalised"):
        dedup(["a", "b"], np.ones((2, 3), np.float32), 0.6)
    with pytest.raises(ValueError, match="2 keys for 3"):
        dedup(["a", "b"], unit([1, 0], [0, 1], [1, 1]), 0.6)
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        dedup(["a", "a"], unit([1, 0], [0, 1]), 0.6)


def test_summary_counts_sources():
    x = unit([1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.01], [0, 0, 1])
    m = dedup(keys(5), x, 0.6, 4)
    s = summary(m, ["real", "real", "synthetic", "synthetic", "real"])
    assert s["n_in"] == 5 and s["n_kept"] == 3 and s["dropped"] == {"duplicate": 2}
    assert s["components_gt1"] == 2 and s["largest_component"] == 2
    assert s["by_source"] == {"real": {"n_in": 3, "n_kept": 2}, "synthetic": {"n_in": 2, "n_kept": 1}}


@pytest.mark.parametrize("index,codes", [("ivf", "sq8"), ("ivf", "flat"), ("hnsw", "sq8")])
def test_approximate_indexes_find_planted_copies(index, codes):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x[1000:1010] = x[:10] + 0.05 * rng.standard_normal((10, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = dedup(keys(2000), x, 0.9, 8, index=index, nprobe=8, ivf_codes=codes, use_gpu=False)
    assert m["kept"].sum() == 1990
    assert (m.loc[:9, "component"].to_numpy() == m.loc[1000:1009, "component"].to_numpy()).all()


def test_params_from_yaml_sections():
    p = build(DedupParams, {"lambda_dup": 0.5, "k_dup": 8, "seed": 3, "dedup": {"index": "ivf", "resize": [320, 320]}},
              "dedup")
    assert (p.lambda_dup, p.k_dup, p.seed, p.index, list(p.resize)) == (0.5, 8, 3, "ivf", [320, 320])
    with pytest.raises(ParamsError, match="index"):
        build(DedupParams, {"dedup": {"index": "annoy"}}, "dedup")
    with pytest.raises(ParamsError, match="resize"):
        build(DedupParams, {"dedup": {"resize": [320]}}, "dedup")
    with pytest.raises(ParamsError, match="ivf_codes"):
        build(DedupParams, {"dedup": {"ivf_codes": "pq"}}, "dedup")
    assert DedupParams().nprobe == 0                      # calibrated by default
    for bad in ({"target_recall": 0.0}, {"target_recall": 1.01}, {"calib_queries": 0}, {"nprobe": -1}):
        with pytest.raises(ParamsError, match=next(iter(bad))):
            build(DedupParams, {"dedup": bad}, "dedup")


# ------------------------------------------------------------------------------------ the stage

def _write_images(root: Path, name: str, items: list[tuple[str, object, str]]) -> Path:
    from pas.io.manifest import write_parquet
    from pas.io.shards import ShardWriter, encode_image

    d = root / name
    with ShardWriter(d, prefix=name) as w:
        for key, img, source in items:
            w.write(key, encode_image(img), {"source": source})
    write_parquet(pd.DataFrame(w.rows), d / "index.parquet")
    return d


def test_stage_end_to_end(tmp_path, clipart_food, monkeypatch):
    """Real clipart + planted exact copies (one real, one synthetic) through stages/dedup.py."""
    from pas.data.images import BadImage, load_rgb
    from pas.models.sscd import build_tiny_sscd

    imgs = []
    for f in clipart_food[::41]:
        try:
            imgs.append(load_rgb(f, max_side=128))
        except BadImage:
            continue
    real = [(f"p{i:04d}", im, "real") for i, im in enumerate(imgs)]
    real.append(("p9999", imgs[0].copy(), "real"))             # exact copy of p0000
    gen = [("g0001", imgs[1].copy(), "synthetic")]             # a "generated" copy of p0001
    images = [_write_images(tmp_path, "retrieved", real), _write_images(tmp_path, "generated", gen)]
    sscd_dir = build_tiny_sscd(tmp_path / "sscd", seed=0)
    params = tmp_path / "params.yaml"
    # the random tiny trunk puts unrelated clipart at cos ≈ 0.95–0.999 (measured); exact copies are 1.0
    params.write_text(yaml.safe_dump({"lambda_dup": 0.99999, "k_dup": 8, "seed": 0,
                                      "dedup": {"device": "cpu", "batch_size": 8}}))
    stage = load_stage("dedup")
    out, metrics = tmp_path / "dedup", tmp_path / "metrics/dedup.json"
    cache = tmp_path / "cache"
    args = ["--images", *map(str, images), "--sscd", str(sscd_dir), "--out", str(out), "--params", str(params),
            "--metrics", str(metrics), "--cache", str(cache)]
    assert stage.main(args) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    assert list(m["key"]) == sorted(m["key"])
    assert m.set_index("key").loc["p9999", "component"] == m.set_index("key").loc["p0000", "component"]
    assert m.set_index("key").loc["g0001", "component"] == m.set_index("key").loc["p0001", "component"]
    met = json.loads(metrics.read_text())
    assert met["n_in"] == len(real) + 1 and met["dropped"]["duplicate"] >= 2
    assert met["n_kept"] + met["dropped"]["duplicate"] == met["n_in"]
    by = met["by_source"]
    assert by["real"]["n_in"] + by["synthetic"]["n_in"] == met["n_in"]
    assert by["real"]["n_kept"] + by["synthetic"]["n_kept"] == met["n_kept"]
    x = np.load(out / "descriptors.npy")
    order = pd.read_parquet(out / "keys.parquet")
    assert x.shape == (met["n_in"], 512) and list(order["row"]) == list(range(len(x)))
    assert json.loads((out / "descriptors.json").read_text())["resize"] == 160
    page = (out / "groups.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 4 and "p9999" in page and "<script" not in page
    # same inputs → same bytes, also when every descriptor chunk is read back from the cache
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(list(cache.glob("*.npz"))) == 1                 # one chunk of <= 512 images
    assert stage.main(args) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert stage.main([*args[:-1], ""]) == 0                   # --cache '': computed afresh, same bytes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # no images at all: an upstream failure, refused in one line (exit 2), nothing written
    empty = _write_images(tmp_path, "empty", [])
    out2 = tmp_path / "dedup_empty"
    before = metrics.read_bytes()
    assert stage.main(["--images", str(empty), "--sscd", str(sscd_dir), "--out", str(out2), "--params", str(params),
                       "--metrics", str(metrics), "--cache", str(tmp_path / "cache_empty")]) == 2
    assert metrics.read_bytes() == before and not out2.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage.main(["--images", str(tmp_path / "nope"), "--sscd", str(sscd_dir), "--out", str(out2),
                    "--params", str(params), "--metrics", str(metrics), "--cache", ""])


# ------------------------------------------------------------------------------------ the report

def test_largest_groups_and_page():
    from pas.curate.report import groups_html, largest_groups
    from pas.io.shards import encode_image
    from PIL import Image

    x = unit([1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.01], [0, 1, 0.02], [0, 0, 1])
    m = dedup(keys(6), x, 0.6, 5)
    groups = largest_groups(m, n_groups=20, per_group=2)
    assert [g["size"] for g in groups] == [3, 2]                  # singletons are not groups
    assert groups[0]["keys"][0] == groups[0]["representative"] and len(groups[0]["keys"]) == 2
    assert largest_groups(m, n_groups=1)[0]["component"] == 0
    imgs = {k: encode_image(Image.new("RGB", (40, 30), (i * 40, 0, 0))) for i, k in enumerate(keys(6))}
    page = groups_html(groups, imgs, {k: {"source": "real", "score": 0.9} for k in keys(6)}, summary={"n_in": 6})
    assert page.count("data:image/jpeg;base64,") == 4 and "showing 2" in page and "class='kept'" in page
    assert page == groups_html(groups, imgs, {k: {"source": "real", "score": 0.9} for k in keys(6)},
                               summary={"n_in": 6})
    assert "No duplicate groups" in groups_html([], {})


def test_stage_resumes_descriptor_chunks_after_a_crash(tmp_path, monkeypatch, caplog):
    """Descriptor chunks finished before a crash are read back; only the missing one is recomputed,
    the outputs are the bytes of an uninterrupted run; a torn chunk file is recomputed; chunks are keyed
    by the input shard's bytes, not its mtime."""
    from PIL import Image

    import pas.models.sscd as sscd_lib
    from pas.models.sscd import build_tiny_sscd

    rng = np.random.default_rng(1)
    imgs = [(f"p{i}", Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), "real")
            for i in range(8)]
    images = _write_images(tmp_path, "retrieved", imgs)
    sscd_dir = build_tiny_sscd(tmp_path / "sscd", seed=0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"lambda_dup": 0.99999, "k_dup": 4, "dedup": {"device": "cpu", "batch_size": 2}}))
    stage = load_stage("dedup")
    stage.CHUNK = 3                                             # 3 chunks: 3 + 3 + 2 images
    cache = tmp_path / "cache"

    def run(out):
        return stage.main(["--images", str(images), "--sscd", str(sscd_dir), "--out", str(tmp_path / out),
                           "--params", str(params), "--metrics", str(tmp_path / f"{out}.json"),
                           "--cache", str(cache)])

    assert run("full") == 0
    full = outputs(tmp_path / "full")
    chunks = sorted(cache.glob("*.npz"))
    assert len(chunks) == 3
    calls = []
    real_run = sscd_lib.ChunkDescriptors.run
    monkeypatch.setattr(sscd_lib.ChunkDescriptors, "run", lambda self, item: calls.append(item) or real_run(self, item))
    chunks[1].unlink()                                          # as if killed before that chunk was stored
    assert run("resumed") == 0
    assert len(calls) == 1 and outputs(tmp_path / "resumed") == full
    # a chunk file torn by a full disk: a miss, recomputed (the log names it), same bytes
    chunks = sorted(cache.glob("*.npz"))
    chunks[0].write_bytes(chunks[0].read_bytes()[:50])
    calls.clear()
    with caplog.at_level(logging.WARNING):
        assert run("torn") == 0
    assert len(calls) == 1 and outputs(tmp_path / "torn") == full and str(chunks[0]) in caplog.text
    # `dvc checkout` / an upstream rerun rewrites the shard with the same bytes: every chunk still hits
    shard = next(images.glob("*.tar"))
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)
    calls.clear()
    assert run("rewritten") == 0
    assert calls == [] and outputs(tmp_path / "rewritten") == full
    # other images: every chunk of the shard is recomputed
    _write_images(tmp_path, "retrieved", [(k, im.rotate(90), src) for k, im, src in imgs])
    assert run("changed") == 0
    assert len(calls) == 3 and outputs(tmp_path / "changed") != full
    assert len(list(cache.glob("*.npz"))) == 3                  # the stale chunks were pruned


def test_collapse_warning_when_a_threshold_stage_keeps_under_half():
    """The `dvc exp run -S lambda_dup=0.5` run of the offline profile (random-init SSCD): 346 images in,
    2 kept — one warning line; leakage at the paper's 0.45 likewise; a normal run, exactly half kept and
    a tiny input are not warned about."""
    from pas.curate.dedup import collapse_warning

    msg = collapse_warning("dedup", {"n_in": 346, "n_kept": 2}, "lambda_dup", 0.5)
    assert msg is not None and msg.startswith("dedup kept 2 of 346 images at lambda_dup=0.5: ") and "\n" not in msg
    leak = collapse_warning("leakage", {"n_in": 150, "n_kept": 20}, "lambda_leak", 0.45)
    assert leak is not None and leak.startswith("leakage kept 20 of 150 images at lambda_leak=0.45: ")
    assert collapse_warning("dedup", {"n_in": 346, "n_kept": 284}, "lambda_dup", 0.9995) is None
    assert collapse_warning("dedup", {"n_in": 346, "n_kept": 173}, "lambda_dup", 0.6) is None   # exactly half
    assert collapse_warning("dedup", {"n_in": 10, "n_kept": 1}, "lambda_dup", 0.5) is None      # too few to tell
