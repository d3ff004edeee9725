"""retrieve: planted pools (the right top-k is known), merge, path safety, shard/index consistency."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pas.collect.retrieve import (PoolError, RetrieveParams, load_pool, merge_hits, prompt_for,
                                  retrieve, search)
from pas.io.manifest import read_metrics, read_parquet, write_parquet
from pas.io.shards import ShardWriter, encode_image, iter_samples, make_key
from pas.params import ParamsError
from tests.helpers import file_digests
from tests.stage_helpers import load_stage

ROOT = Path(__file__).resolve().parents[1]
D = 8


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class FakeEncoder:
    """CLIP-like text encoder: planted vectors for known prompts, a hash-seeded vector otherwise."""

    def __init__(self, planted: dict[str, np.ndarray], fingerprint: str = "fake-clip-1"):
        self.planted, self.fingerprint, self.calls = planted, fingerprint, []

    def encode_texts(self, texts, batch_size=256):
        self.calls.append(list(texts))
        out = []
        for t in texts:
            if t in self.planted:
                out.append(self.planted[t])
            else:
                seed = int(hashlib.sha1(t.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16)
                out.append(np.random.default_rng(seed).normal(size=D))
        return unit(np.stack(out)) if out else np.zeros((0, D), np.float32)


def make_pool(d: Path, n: int = 30, seed: int = 0, fingerprint: str = "fake-clip-1", maxcount: int = 8):
    """A pool folder by hand: n tiny images in several shards, random unit embeddings, IndexFlatIP."""
    import faiss

    rng = np.random.default_rng(seed)
    E = unit(rng.normal(size=(n, D)))
    rows, keys = [], []
    with ShardWriter(d, prefix="pool", maxcount=maxcount) as w:
        for i in range(n):
            key = make_key("p", "img", i)
            img = Image.new("RGB", (8 + i % 3, 8), (i * 8 % 256, 40, 200))
            ext = "png" if i % 2 else "jpg"
            shard = w.write(key, encode_image(img, ext), {"source": "pool", "path": f"x/{i}.{ext}"}, ext=ext)
            rows.append({"key": key, "shard": shard, "path": f"x/{i}.{ext}", "width": img.width,
                         "height": img.height, "category": "c"})
            keys.append(key)
    # index.parquet rows are in faiss order (= shard order), not sorted by key
    pd.DataFrame(rows).to_parquet(d / "index.parquet", index=False)
    np.save(d / "embeddings.npy", E)
    fi = faiss.IndexFlatIP(D)
    fi.add(E)
    faiss.write_index(fi, str(d / "faiss.index"))
    (d / "pool.json").write_text(json.dumps({"clip_fingerprint": fingerprint, "clip_dir": "models/clip",
                                             "n": n, "dim": D}))
    return E, keys


@pytest.fixture()
def pool(tmp_path):
    E, keys = make_pool(tmp_path / "pool")
    return tmp_path / "pool", E, keys


def test_search_matches_brute_force():
    import faiss

    rng = np.random.default_rng(1)
    E = unit(rng.normal(size=(57, D)))
    T = unit(rng.normal(size=(13, D)))
    fi = faiss.IndexFlatIP(D)
    fi.add(E)
    for k in (1, 5, 57, 80):
        for bs in (1, 4, 100):
            S, I = search(fi, T, k, bs, progress=False)
            kk = min(k, 57)
            ref = np.argsort(-(T @ E.T), axis=1, kind="stable")[:, :kk]
            assert I.shape == (13, kk)
            np.testing.assert_array_equal(I, ref)
            np.testing.assert_allclose(S, np.take_along_axis(T @ E.T, ref, 1), atol=1e-5)


def test_search_is_batched_over_concepts():
    class CountingIndex:
        ntotal, d = 10, D

        def __init__(self):
            self.calls = []

        def search(self, x, k):
            self.calls.append(len(x))
            return np.zeros((len(x), k), np.float32), np.zeros((len(x), k), np.int64)

    fi = CountingIndex()
    search(fi, np.zeros((10, D), np.float32), 3, batch_size=4, progress=False)
    assert fi.calls == [4, 4, 2]


def test_merge_hits_hand_case():
    keys = np.array(["pa", "pb", "pc"])
    S = np.array([[0.9, 0.5], [0.7, 0.6]], np.float32)
    I = np.array([[0, 1], [1, -1]])
    hits = merge_hits(["x", "y"], S, I, keys)
    assert list(hits.keys) == ["pa", "pb"] and "pc" not in hits
    assert hits.of("pa") == (["x"], [0.9]) and hits.of("pb") == (["y", "x"], [0.7, 0.5])
    assert hits.counts() == {"x": 2, "y": 1}


def test_planted_top_k_and_merge(pool, tmp_path):
    pool_dir, E, keys = pool
    # "apple" points exactly at image 3; "pear" halfway between images 3 and 7 → shares image 3
    planted = {"a photo of apple.": E[3], "a photo of pear.": unit(E[3] + E[7])}
    enc = FakeEncoder(planted)
    out = tmp_path / "out"
    m = retrieve(["apple", "pear"], out, RetrieveParams(k_retrieve=4, batch_size=1), encoder=enc,
                 pool_dir=pool_dir, progress=False)
    assert enc.calls == [["a photo of apple.", "a photo of pear."]]   # one text batch for all concepts
    ref = {c: list(np.argsort(-(E @ planted[f"a photo of {c}."]), kind="stable")[:4]) for c in ("apple", "pear")}
    assert ref["apple"][0] == 3 and set(ref["pear"][:2]) == {3, 7}
    idx = read_parquet(out / "index.parquet")
    expected = {keys[i] for c in ref for i in ref[c]}
    assert set(idx["key"]) == expected
    assert list(idx["key"]) == sorted(idx["key"])
    shared = keys[3]
    row = idx[idx.key == shared].iloc[0]
    assert list(row.concepts) == ["apple", "pear"]           # sorted by similarity: apple's is 1.0
    assert row.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert row.similarities[0] >= row.similarities[1]
    assert m["n_images"] == 8 and m["n_unique"] == len(expected)
    assert m["hits_per_concept_min"] == m["hits_per_concept_max"] == 4
    assert m["concepts_zero_hits"] == 0
    hits = read_parquet(out / "hits.parquet")
    for c in ("apple", "pear"):
        h = hits[hits.concept == c]
        assert list(h["key"]) == [keys[i] for i in ref[c]] and list(h["rank"]) == [0, 1, 2, 3]


def test_shards_match_index_and_pool_bytes(pool, tmp_path):
    pool_dir, E, keys = pool
    out = tmp_path / "out"
    concepts = [f"c{i}" for i in range(9)]
    retrieve(concepts, out, RetrieveParams(k_retrieve=5, shard_size=4, batch_size=4), encoder=FakeEncoder({}),
             pool_dir=pool_dir, progress=False)
    idx = read_parquet(out / "index.parquet")
    samples = list(iter_samples(out))
    assert len(samples) == len(idx) and len({s.key for s in samples}) == len(samples)
    shard_of = dict(zip(idx.key, idx.shard))
    pool_bytes = {s.key: (s.image, s.ext) for s in iter_samples(pool_dir)}
    counts = {}
    for s in samples:
        assert shard_of[s.key] == s.shard
        assert (s.image, s.ext) == pool_bytes[s.key]           # bytes copied, not re-encoded
        assert s.meta["source"] == "real" and s.meta["pool_key"] == s.key == s.meta["key"]
        assert len(s.meta["concepts"]) == len(s.meta["similarities"]) >= 1
        assert s.meta["similarities"] == sorted(s.meta["similarities"], reverse=True)
        for c in s.meta["concepts"]:
            counts[c] = counts.get(c, 0) + 1
        counts_shard = counts.setdefault("#" + s.shard, 0)
        counts["#" + s.shard] = counts_shard + 1
    assert all(counts[c] == 5 for c in concepts)
    assert all(v <= 4 for k, v in counts.items() if k.startswith("#"))


def test_byte_identical_reruns(pool, tmp_path):
    pool_dir, _, _ = pool
    p = RetrieveParams(k_retrieve=6, shard_size=5)
    retrieve(["x", "y", "z"], tmp_path / "a", p, encoder=FakeEncoder({}), pool_dir=pool_dir, progress=False)
    retrieve(["x", "y", "z"], tmp_path / "b", p, encoder=FakeEncoder({}), pool_dir=pool_dir, progress=False)
    # a rerun into a dirty folder replaces its own files
    retrieve(["x"], tmp_path / "b", p, encoder=FakeEncoder({}), pool_dir=pool_dir, progress=False)
    retrieve(["x", "y", "z"], tmp_path / "b", p, encoder=FakeEncoder({}), pool_dir=pool_dir, progress=False)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")


def as_hits(hits: dict, pool_keys: list[str]):
    """`merge_hits` of the top-k lists that give the per-image lists `hits` (pool order: `pool_keys`);
    checks it gives back every image's list, ties in similarity by concept name."""
    concepts = sorted({c for lst in hits.values() for c, _ in lst}, reverse=True)
    per = {c: [] for c in concepts}
    for i, k in enumerate(pool_keys):
        for c, sim in hits.get(k, []):
            per[c].append((sim, i))
    S = np.zeros((len(concepts), max(map(len, per.values()), default=0)), np.float32)
    I = np.full(S.shape, -1, np.int64)
    for r, c in enumerate(concepts):
        for j, (sim, i) in enumerate(per[c]):
            S[r, j], I[r, j] = sim, i
    H = merge_hits(concepts, S, I, np.array(pool_keys, dtype=object))
    assert list(H.keys) == [k for k in pool_keys if hits.get(k)]
    assert all(H.of(k) == ([c for c, _ in lst], [v for _, v in lst]) for k, lst in hits.items() if lst)
    return H


def test_index_bytes_same_as_a_dict_per_image(tmp_path):
    """write_images keeps columns, not a row dict per image: index.parquet is byte for byte the one
    a DataFrame of those dicts gives (None and str mixed in path / url, 1-3 concepts per image)."""
    import shutil

    import pas.collect.retrieve as R
    from pas.io.shards import write_index as write_shard_index

    keys = [make_key("p", i) for i in range(11)]
    hits = {k: [(f"c{j}", round(0.9 - 0.1 * j - 0.01 * i, 6)) for j in range(1 + i % 3)] for i, k in enumerate(keys)}
    extra = [{"pool_key": k, "path": None if i % 4 == 0 else f"x/{i}.jpg", "url": "u" if i == 5 else None}
             for i, k in enumerate(keys)]
    out = tmp_path / "out"
    out.mkdir()
    samples = ((k, encode_image(Image.new("RGB", (8, 8), (i, 0, 0))), "jpg", e)
               for i, (k, e) in enumerate(zip(keys, extra)))
    H = as_hits(hits, keys)
    R.write_index(R.write_images(samples, H, out, maxcount=4), H, out)
    rows = [{"key": s.key, "shard": s.shard, **{c: e.get(c) for c in R.PROVENANCE},
             "n_concepts": len(hits[s.key]), "concept": hits[s.key][0][0], "similarity": hits[s.key][0][1],
             "concepts": [c for c, _ in hits[s.key]], "similarities": [v for _, v in hits[s.key]]}
            for s, e in zip(iter_samples(out), extra)]
    ref = tmp_path / "ref"
    ref.mkdir()
    for shard in out.glob("*.tar"):
        shutil.copy(shard, ref / shard.name)
    write_shard_index(pd.DataFrame(rows, columns=R.INDEX_COLUMNS), ref)
    assert (out / "index.parquet").read_bytes() == (ref / "index.parquet").read_bytes()
    assert len(rows) == len(keys) and read_parquet(out / "index.parquet")["url"].tolist().count("u") == 1



def _tuple_hits_frame(keys, hits):
    # hits.parquet's table as a DataFrame of (concept, key, similarity) tuples gave it
    long = [(c, k, s) for k, lst in hits.items() if k in set(keys) for c, s in lst]
    df = pd.DataFrame(long, columns=["concept", "key", "similarity"])
    df = df.sort_values(["concept", "similarity", "key"], ascending=[True, False, True], kind="stable")
    df["rank"] = df.groupby("concept").cumcount().astype("int64")
    return df[["concept", "rank", "key", "similarity"]]


@pytest.mark.parametrize("n", [0, 1, 7, 400])
def test_hits_bytes_same_as_a_tuple_per_hit(tmp_path, n):
    """hits.parquet from arrays (`hits_frame`) is byte for byte the one a frame of a tuple per hit
    gave: similarity ties broken by key, concepts (non-ASCII too) in str order, a hit image that
    was not stored left out, no hits at all."""
    from pas.collect.retrieve import hits_frame

    rng = np.random.default_rng(n)
    keys = [make_key("p", i) for i in range(n)]
    names = ["ramen", "Ramen", "phở", "pho", "b", "a b", "🍜"]
    hits = {}
    for k in keys + ["pNOTSTORED"]:
        cs = rng.choice(len(names), int(rng.integers(1, 4)), replace=False)
        lst = [(names[c], float(rng.choice([0.25, 0.5, round(float(rng.uniform(0, 1)), 6)]))) for c in cs]
        hits[k] = sorted(lst, key=lambda cs: (-cs[1], cs[0]))
    H = as_hits(hits, keys + ["pNOTSTORED"])
    for name, df in (("tuples", _tuple_hits_frame(keys, hits)), ("arrays", hits_frame(keys, H, H.positions(keys)))):
        write_parquet(df, tmp_path / f"{name}.parquet", sort_by=None)
    assert (tmp_path / "tuples.parquet").read_bytes() == (tmp_path / "arrays.parquet").read_bytes()
    got = read_parquet(tmp_path / "arrays.parquet")
    assert len(got) == sum(len(hits[k]) for k in keys)
    if n == 400:        # ties in similarity do occur, and ranks restart per concept
        assert got.duplicated(["concept", "similarity"]).any()
        assert (got.groupby("concept")["rank"].apply(lambda r: list(r) == list(range(len(r))))).all()


HOSTILE = ["../../../etc/passwd", "/abs/path", "a\\b\\..\\c", 'quote"d \'x\'', "🍕🍣 pizza party",
           "x" * 1000, "{c} {0} %s", "tab\there\nnewline", "nul\x00byte", ".", "..", "-rf"]


def test_hostile_concepts_stay_inside(pool, tmp_path):
    pool_dir, _, _ = pool
    out = tmp_path / "data" / "retrieved"
    before = file_digests(tmp_path)
    m = retrieve(HOSTILE, out, RetrieveParams(k_retrieve=3, shard_size=4), encoder=FakeEncoder({}),
                 pool_dir=pool_dir, progress=False)
    after = file_digests(tmp_path)
    new = set(after) - set(before)
    assert all(p.startswith("data/retrieved/") for p in new)
    assert {Path(p).name for p in new} <= {"index.parquet", "hits.parquet"} | {
        f"retrieved-{i:06d}.tar" for i in range(100)}
    seen = set()
    for s in iter_samples(out):
        seen.update(s.meta["concepts"])
    assert seen == set(HOSTILE)                       # concept text round-trips exactly
    assert m["n_images"] == 3 * len(HOSTILE)
    assert prompt_for("{c}", "a photo of {c}.") == "a photo of {c}."   # no recursive substitution


def test_fingerprint_mismatch_refused(pool, tmp_path):
    pool_dir, _, _ = pool
    out = tmp_path / "out"
    with pytest.raises(PoolError, match="rebuild the pool"):
        retrieve(["x"], out, RetrieveParams(k_retrieve=2), encoder=FakeEncoder({}, fingerprint="other"),
                 pool_dir=pool_dir, progress=False)
    assert not out.exists()                            # nothing written before the check


def test_incomplete_pool_refused(pool, tmp_path):
    pool_dir, _, _ = pool
    (pool_dir / "faiss.index").unlink()
    with pytest.raises(PoolError, match="missing faiss.index"):
        load_pool(pool_dir)


def test_params_validation():
    with pytest.raises(ParamsError, match="prompt_template"):
        RetrieveParams(prompt_template="a photo of {}.")
    with pytest.raises(ParamsError, match="service.url"):
        RetrieveParams(backend="clip_service")
    with pytest.raises(ParamsError, match="retrieve.service.bogus"):
        RetrieveParams(service={"bogus": 1})
    assert RetrieveParams(backend="clip_service", service={"url": "http://h:1/knn-service"})


def test_stage_main_with_tiny_clip(tmp_path, monkeypatch):
    """The stage end to end with a real (tiny, random) open_clip CLIP and a pool embedded by it."""
    import faiss

    from pas.models.clip import build_tiny_clip, load_clip

    clip_dir = build_tiny_clip(tmp_path / "clip", seed=0)
    clip = load_clip(clip_dir)
    pool_dir = tmp_path / "pool"
    rows, pils = [], []
    with ShardWriter(pool_dir, prefix="pool") as w:
        for i in range(12):
            img = Image.new("RGB", (64, 64), (i * 20, 255 - i * 20, 90))
            key = make_key("p", i)
            rows.append({"key": key, "shard": w.write(key, encode_image(img), {"source": "pool"}),
                         "path": f"{i}.png", "width": 64, "height": 64, "category": "food"})
            pils.append(img)
    pd.DataFrame(rows).to_parquet(pool_dir / "index.parquet", index=False)
    E = clip.encode_images(pils)
    fi = faiss.IndexFlatIP(E.shape[1])
    fi.add(E)
    faiss.write_index(fi, str(pool_dir / "faiss.index"))
    (pool_dir / "pool.json").write_text(json.dumps({"clip_fingerprint": clip.fingerprint, "clip_dir": "clip",
                                                    "n": 12, "dim": int(E.shape[1])}))
    write_parquet(pd.DataFrame({"concept": ["apple pie", "🍕"], "accepted": [True, True]}),
                  tmp_path / "bank.parquet")
    (tmp_path / "params.yaml").write_text("k_retrieve: 5\nretrieve:\n  prompt_template: 'a photo of {c}, a food.'\n")
    stage = load_stage("retrieve")
    argv = ["--concepts", str(tmp_path / "bank.parquet"), "--pool", str(pool_dir), "--clip", str(clip_dir),
            "--out", str(tmp_path / "retrieved"), "--metrics", str(tmp_path / "m.json"),
            "--params", str(tmp_path / "params.yaml")]
    assert stage.main(argv) == 0
    m = read_metrics(tmp_path / "m.json")
    assert m["n_images"] == 10 and m["hits_per_concept_min"] == 5 and m["k_effective"] == 5
    T = clip.encode_texts(["a photo of apple pie, a food.", "a photo of 🍕, a food."])
    ref = {keys for keys in (frozenset(rows[i]["key"] for i in np.argsort(-(E @ t))[:5]) for t in T)}
    assert set(read_parquet(tmp_path / "retrieved" / "index.parquet")["key"]) == set().union(*ref)
    # a pool built by another CLIP: clear refusal, exit code 2, no traceback
    meta = json.loads((pool_dir / "pool.json").read_text())
    (pool_dir / "pool.json").write_text(json.dumps({**meta, "clip_fingerprint": "0" * 64}))
    assert stage.main(argv) == 2


def test_pool_path_writes_as_it_goes(pool, tmp_path, monkeypatch):
    """No list of all images: when the 7th pool image is read, the shards of the first four are
    already complete on disk (shard_size 2; the third shard is still open)."""
    import tarfile

    import pas.collect.retrieve as R

    pool_dir, _, _ = pool
    out = tmp_path / "out"
    real, seen = R._pool_samples, []

    def spy(p, wanted):
        for i, s in enumerate(real(p, wanted)):
            if i == 6:
                seen.append({f.name: len(tarfile.open(f).getnames())
                             for f in sorted(out.glob("retrieved-*.tar"))[:-1]})
            yield s
    monkeypatch.setattr(R, "_pool_samples", spy)
    retrieve(["x", "y"], out, RetrieveParams(k_retrieve=8, shard_size=2), encoder=FakeEncoder({}),
             pool_dir=pool_dir, progress=False)
    assert seen[0] == {"retrieved-000000.tar": 4, "retrieved-000001.tar": 4}     # 2 images + 2 json each
