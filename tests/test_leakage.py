"""Leakage: hand-computed cases, eval-set discovery, and planted copies of real test images found by
the tiny SSCD through stages/leakage.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pas.curate.leakage import LeakageParams, by_component, leakage, resolve_evalsets, summary
from pas.params import ParamsError, build
from tests.stage_helpers import load_stage, outputs


def unit(*rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------ pure function

def test_hand_computed():
    x = unit([1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0.3, 0.0, 0.954])
    xt = unit([1, 0, 0], [0, 1, 0], [0.8, 0.6, 0])
    m = leakage(["a", "b", "c", "d"], x, ["t0", "t1", "t2"], ["s1", "s1", "s2"], xt, lambda_leak=0.45, k_leak=3)
    r = m.set_index("key")
    # a: cos to t0 = 1, t2 = 0.8 → dropped, nearest t0, two matches above 0.45
    assert not r.loc["a", "kept"] and r.loc["a", "nearest_key"] == "t0" and r.loc["a", "evalset"] == "s1"
    assert r.loc["a", "n_matches"] == 2 and r.loc["a", "reason"] == "leak"
    # b: cos to t2 = 0.96, t1 = 0.8, t0 = 0.6 → dropped, nearest t2 of set s2, three matches
    assert not r.loc["b", "kept"] and r.loc["b", "nearest_key"] == "t2" and r.loc["b", "evalset"] == "s2"
    assert r.loc["b", "n_matches"] == 3
    np.testing.assert_allclose(r.loc["b", "score"], 0.96, atol=1e-6)
    # c: orthogonal to all → kept; d: best cos 0.3·(1 or 0.8) ≤ 0.45 → kept
    assert r.loc["c", "kept"] and r.loc["c", "n_matches"] == 0 and r.loc["c", "reason"] == ""
    assert r.loc["d", "kept"]
    s = summary(m, {"s1": 2, "s2": 1})
    assert s == {"n_in": 4, "n_kept": 2, "dropped": {"leak": 2},
                 "by_source": {"real": {"n_in": 4, "n_kept": 2}, "synthetic": {"n_in": 0, "n_kept": 0}},
                 "dropped_per_evalset": {"s1": 1, "s2": 1}, "n_test": {"s1": 2, "s2": 1}}


def test_by_component_hand_computed():
    """Every dedup input is checked; a leak drops its whole dedup component (scope "component").

    Paper: SSCD filtering "eliminates images resembling any in the test sets"; a kept image whose
    removed duplicate resembles a test image carries that image's content, so it goes too.
    Inputs a, b (one component, dedup kept a), c alone, d, e (one component, dedup kept d);
    tests t0 = e1, t1 = e2. Cosines: a·t0 = 0.3, b·t0 = 0.9, c = 0, d·t1 = 1, e·t1 = 0.2.
    """
    x = unit([0.3, 0, 0.954], [0.9, 0, 0.436], [0, 0, 1], [0, 1, 0], [0, 0.2, 0.98])
    checked = leakage(list("abcde"), x, ["t0", "t1"], ["s0", "s1"], unit([1, 0, 0], [0, 1, 0]),
                      lambda_leak=0.45, k_leak=2)
    assert checked["kept"].tolist() == [True, False, True, False, True]       # b and d leak
    comp, dedup_kept = [0, 0, 1, 2, 2], [True, False, True, True, False]

    m = by_component(checked, comp, dedup_kept, "component").set_index("key")
    assert list(m.index) == ["a", "c", "d"]                                   # rows: dedup's kept images
    assert m["kept"].tolist() == [False, True, False]
    assert m["reason"].tolist() == ["leak_component", "", "leak"]
    # a is dropped for b: the row names b, its score 0.9 and b's nearest test image t0
    assert (m.loc["a", "via"], m.loc["a", "nearest_key"], m.loc["a", "evalset"]) == ("b", "t0", "s0")
    np.testing.assert_allclose(m.loc["a", "score"], 0.9, atol=1e-3)
    assert m.loc["d", "via"] == "d" and m["component_leaks"].tolist() == [True, False, True]
    s = summary(m.reset_index(), {"s0": 1, "s1": 1}, ["real", "real", "synthetic"], checked=checked)
    assert s == {"n_in": 3, "n_kept": 1, "dropped": {"leak": 1, "leak_component": 1},
                 "by_source": {"real": {"n_in": 2, "n_kept": 1}, "synthetic": {"n_in": 1, "n_kept": 0}},
                 "dropped_per_evalset": {"s0": 1, "s1": 1}, "n_test": {"s0": 1, "s1": 1},
                 "dropped_if_image_scope": 1, "dropped_if_component_scope": 2,
                 "n_checked": 5, "n_checked_leaking": 2}

    img = by_component(checked, comp, dedup_kept, "image").set_index("key")
    assert img["kept"].tolist() == [True, True, False] and img["reason"].tolist() == ["", "", "leak"]
    assert img.loc["a", "via"] == "a" and img.loc["a", "component_leaks"]     # a's own score, 0.3
    np.testing.assert_allclose(img.loc["a", "score"], 0.3, atol=1e-3)
    s = summary(img.reset_index(), {"s0": 1, "s1": 1}, checked=checked)
    assert (s["dropped"], s["dropped_if_image_scope"], s["dropped_if_component_scope"]) == ({"leak": 1}, 1, 2)
    assert len(by_component(checked.iloc[:0], [], [], "component")) == 0
    with pytest.raises(ValueError, match="components"):
        by_component(checked, comp[:4], dedup_kept, "image")


def test_k_leak_bounds_n_matches():
    x = unit([1, 0])
    xt = unit([1, 0], [1, 0.01], [1, 0.02], [1, 0.03])
    assert leakage(["a"], x, list("pqrs"), ["e"] * 4, xt, 0.45, k_leak=2).loc[0, "n_matches"] == 2
    assert leakage(["a"], x, list("pqrs"), ["e"] * 4, xt, 0.45, k_leak=32).loc[0, "n_matches"] == 4


def test_strictly_above_lambda():
    x = np.array([[np.float32(0.45), np.sqrt(1 - np.float32(0.45) ** 2)]], np.float32)
    m = leakage(["a"], x, ["t"], ["e"], unit([1, 0]), lambda_leak=0.45, k_leak=1)
    assert m.loc[0, "score"] == np.float32(0.45) and m.loc[0, "kept"]


def test_empty_inputs():
    m = leakage([], np.zeros((0, 8), np.float32), ["t"], ["e"], unit([1] * 8), 0.45)
    assert len(m) == 0 and summary(m, {"e": 1})["n_in"] == 0
    m = leakage(["a", "b"], unit([1, 0], [0, 1]), [], [], np.zeros((0, 2), np.float32), 0.45)
    assert m["kept"].all() and m["score"].isna().all() and (m["evalset"] == "").all()
    assert summary(m, {})["n_kept"] == 2


def test_dims_mismatch_refused():
    with pytest.raises(ValueError, match="does not match"):
        leakage(["a"], unit([1, 0, 0]), ["t"], ["e"], unit([1, 0]), 0.45)
    with pytest.raises(ValueError, match="test keys"):
        leakage(["a"], unit([1, 0]), ["t", "u"], ["e"], unit([1, 0]), 0.45)


def test_params():
    p = build(LeakageParams, {"lambda_leak": 0.3, "k_leak": 4, "leakage": {"evalsets": ["fruit"]}}, "leakage")
    assert (p.lambda_leak, p.k_leak, p.evalsets, p.scope) == (0.3, 4, ["fruit"], "component")
    with pytest.raises(ParamsError, match="scope"):
        build(LeakageParams, {"leakage": {"scope": "set"}}, "leakage")
    with pytest.raises(ParamsError, match="evalsets"):
        build(LeakageParams, {"leakage": {"evalsets": ["../etc"]}}, "leakage")


def test_resolve_evalsets(tmp_path):
    (tmp_path / "a" / "test").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "user").mkdir()
    sets = resolve_evalsets(tmp_path, [], "test", {"mine": tmp_path / "user"})
    assert sets == {"a": tmp_path / "a" / "test", "b": tmp_path / "b", "user": tmp_path / "user",
                    "mine": tmp_path / "user"}
    assert list(resolve_evalsets(tmp_path, ["b"])) == ["b"]
    with pytest.raises(FileNotFoundError, match="eval set 'zzz'"):
        resolve_evalsets(tmp_path, ["zzz"])
    assert resolve_evalsets(None, [], "test", None) == {}


# ------------------------------------------------------------------------ the stage, real clipart

def _jpeg_resized(img: Image.Image, scale: float = 0.8, q: int = 90) -> Image.Image:
    img = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


LAMBDA_TINY = 0.9995   # for the random tiny trunk only; see the measured distribution asserted below


def stage_inputs(tmp_path: Path, clipart_food) -> dict:
    """The leakage stage's inputs on real clipart: an eval set in the evalsets layout (5 images in
    shards), a user ImageFolder (3), and dedup outputs whose images include planted copies."""
    from pas.data.images import BadImage, load_rgb
    from pas.io.manifest import write_parquet
    from pas.io.shards import ShardWriter, encode_image
    from pas.jsonio import write_json
    from pas.models.sscd import build_tiny_sscd, descriptors, fingerprint, load_sscd

    imgs = []
    for f in clipart_food[5::23]:
        try:
            imgs.append(load_rgb(f, max_side=128))
        except BadImage:
            continue
    assert len(imgs) >= 12
    test_wds, test_folder, dataset = imgs[:5], imgs[5:8], imgs[8:]

    # eval set 1: the evalsets stage's layout (shards + index.parquet under <name>/test)
    root = tmp_path / "evalsets"
    with ShardWriter(root / "food" / "test", prefix="test") as w:
        for i, im in enumerate(test_wds):
            w.write(f"t{i}", encode_image(im), {"label": i % 2, "source": "real"})
    write_parquet(pd.DataFrame([{**r, "label": i % 2} for i, r in enumerate(w.rows)]),
                  root / "food" / "test" / "index.parquet")
    # eval set 2: a user's ImageFolder
    folder = tmp_path / "user_set"
    for i, im in enumerate(test_folder):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        im.save(folder / f"class{i % 2}" / f"img{i}.png")

    # the dataset: unrelated clipart + a JPEG re-encoded, resized copy of t2 + an exact copy of img1,
    # + a copy of t0 that dedup removed as a duplicate of p000 (must not appear, but takes p000 along)
    sscd_dir = build_tiny_sscd(tmp_path / "sscd", seed=0)
    model = load_sscd(sscd_dir)
    data = [(f"p{i:03d}", im) for i, im in enumerate(dataset)]
    data += [("p900", _jpeg_resized(test_wds[2])), ("p901", test_folder[1].copy()), ("p902", test_wds[0].copy())]
    keys = [k for k, _ in data]
    x = descriptors(model, [im for _, im in data], resize=160)
    d = tmp_path / "dedup"
    d.mkdir()
    np.save(d / "descriptors.npy", x)
    write_parquet(pd.DataFrame({"row": np.arange(len(keys)), "key": keys, "source": "real"}), d / "keys.parquet",
                  sort_by=None)
    comp = [0 if k == "p902" else i for i, k in enumerate(keys)]          # p902's component is p000's
    write_parquet(pd.DataFrame({"key": keys, "kept": [k != "p902" for k in keys], "component": comp}),
                  d / "manifest.parquet")
    write_json(d / "descriptors.json", {"model_sha256": fingerprint(sscd_dir), "resize": 160, "dims": 512,
                                        "n": len(keys)})

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"lambda_leak": LAMBDA_TINY, "k_leak": 4,
                                      "leakage": {"device": "cpu", "batch_size": 4}}))
    args = ["--dedup", str(d), "--evalsets", str(root), "--evalset", f"mine={folder}", "--sscd", str(sscd_dir),
            "--params", str(params)]
    return {"args": args, "keys": keys, "x": x, "model": model, "test_wds": test_wds, "test_folder": test_folder,
            "dataset": dataset, "dedup": d}


def test_stage_finds_planted_copies(tmp_path, clipart_food, monkeypatch):
    from pas.jsonio import write_json
    from pas.models.sscd import descriptors

    ctx = stage_inputs(tmp_path, clipart_food)
    keys, x, model, d = ctx["keys"], ctx["x"], ctx["model"], ctx["dedup"]
    test_wds, test_folder, dataset = ctx["test_wds"], ctx["test_folder"], ctx["dataset"]
    # the measured similarity distribution of this sample supports the tiny-model threshold
    xt = descriptors(model, test_wds + test_folder, resize=160)
    s = x @ xt.T
    copies = [s[keys.index("p900"), 2], s[keys.index("p901"), 5 + 1]]
    unrelated = s[: len(dataset)].max()
    assert min(copies) > LAMBDA_TINY > unrelated, (copies, unrelated)

    stage = load_stage("leakage")
    out, metrics = tmp_path / "leakage", tmp_path / "metrics" / "leakage.json"
    args = [*ctx["args"], "--out", str(out), "--metrics", str(metrics)]
    assert stage.main(args) == 0
    m = pd.read_parquet(out / "manifest.parquet").set_index("key")
    assert "p902" not in m.index and len(m) == len(keys) - 1
    # p000 goes with its removed duplicate p902, a copy of t0 (default scope: component)
    assert sorted(m.index[~m["kept"]]) == ["p000", "p900", "p901"]
    assert (m.loc["p000", "reason"], m.loc["p000", "via"], m.loc["p000", "nearest_key"]) == \
        ("leak_component", "p902", "t0")
    assert (m.loc["p900", "nearest_key"], m.loc["p900", "evalset"]) == ("t2", "food")
    assert (m.loc["p901", "nearest_key"], m.loc["p901", "evalset"]) == ("class1/img1.png", "mine")
    assert len(pd.read_parquet(out / "checked.parquet")) == len(keys)      # every dedup input
    met = json.loads(metrics.read_text())
    assert met == {"n_in": len(keys) - 1, "n_kept": len(keys) - 4, "dropped": {"leak": 2, "leak_component": 1},
                   "by_source": {"real": {"n_in": len(keys) - 1, "n_kept": len(keys) - 4},
                                 "synthetic": {"n_in": 0, "n_kept": 0}},
                   "dropped_per_evalset": {"food": 2, "mine": 1}, "n_test": {"food": 5, "mine": 3},
                   "dropped_if_image_scope": 2, "dropped_if_component_scope": 3, "n_checked": len(keys),
                   "n_checked_leaking": 3, "scope": "component"}
    # scope image: only the kept images that leak themselves
    params = yaml.safe_load(Path(args[args.index("--params") + 1]).read_text())
    params["leakage"]["scope"] = "image"
    (tmp_path / "image.yaml").write_text(yaml.safe_dump(params))
    img_args = [*args, "--params", str(tmp_path / "image.yaml"), "--out", str(tmp_path / "leak_img")]
    assert stage.main(img_args) == 0
    mi = pd.read_parquet(tmp_path / "leak_img" / "manifest.parquet").set_index("key")
    assert sorted(mi.index[~mi["kept"]]) == ["p900", "p901"] and mi.loc["p000", "component_leaks"]
    assert json.loads(metrics.read_text())["dropped_if_component_scope"] == 3
    # descriptors made by another model are refused
    write_json(d / "descriptors.json", {"model_sha256": "0" * 64, "resize": 160, "dims": 512, "n": len(keys)})
    with pytest.raises(ValueError, match="rerun dedup"):
        stage.main(args)


def test_test_chunks_span_shards_and_skip_bad_files(tmp_path, clipart_food):
    """The chunk plan (`pas.data.chunks`) behind the test descriptors: shard items span shards, file
    items list paths; loading every item gives exactly `iter_test_images`."""
    from pas.data.chunks import load_chunk, plan_chunks
    from pas.io.shards import ShardWriter, encode_image
    from tests.helpers import chunk_size, iter_test_images

    imgs = [Image.new("RGB", (20 + i, 20), (10 * i, 0, 0)) for i in range(7)]
    with ShardWriter(tmp_path / "wds", prefix="t", maxcount=3) as w:
        for i, im in enumerate(imgs):
            w.write(f"t{i}", encode_image(im), {})
    items = plan_chunks(tmp_path / "wds", 2)
    assert [chunk_size(it) for it in items] == [2, 2, 2, 1]
    assert items[1] == ("shards", [(str(tmp_path / "wds" / "t-000000.tar"), 2, 3),
                                   (str(tmp_path / "wds" / "t-000001.tar"), 0, 1)])
    keys = [k for it in items for k, _ in load_chunk(it)]
    assert keys == [f"t{i}" for i in range(7)] == [k for k, _ in iter_test_images(tmp_path / "wds")]
    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    imgs[0].save(folder / "a.png")
    imgs[1].save(folder / "b" / "c.png")
    (folder / "b" / "d.png").write_bytes(b"not a png")
    items = plan_chunks(folder, 2)
    assert items == [("files", str(folder), ["a.png", "b/c.png"]), ("files", str(folder), ["b/d.png"])]
    assert [k for it in items for k, _ in load_chunk(it, max_side=16)] == ["a.png", "b/c.png"]
    assert [im.size for it in items for _, im in load_chunk(it, max_side=16)] == [(16, 16), (16, 15)]


def test_stage_resumes_test_descriptor_chunks(tmp_path, clipart_food, monkeypatch):
    """leakage keeps finished test-descriptor chunks like dedup does (pas.engine.map_resumable): after a
    kill only the missing chunk is recomputed, for shard spans and for ImageFolder files alike, and the
    outputs are the bytes of an uninterrupted run."""
    import pas.models.sscd as sscd_lib

    ctx = stage_inputs(tmp_path, clipart_food)
    stage = load_stage("leakage")
    stage.CHUNK = 2                       # food: 2 + 2 + 1 images in shards, mine: 2 + 1 files
    cache = tmp_path / "cache"

    def run(out):
        return stage.main([*ctx["args"], "--out", str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json"),
                           "--cache", str(cache)])

    assert run("full") == 0
    full = outputs(tmp_path / "full")
    chunks = sorted(cache.glob("*.npz"))
    assert len(chunks) == 5
    calls = []
    real_run = sscd_lib.ChunkDescriptors.run
    monkeypatch.setattr(sscd_lib.ChunkDescriptors, "run", lambda self, item: calls.append(item) or real_run(self, item))
    assert run("again") == 0 and calls == [] and outputs(tmp_path / "again") == full
    for c in chunks[1::2]:                # as if killed before these were stored
        c.unlink()
    assert run("resumed") == 0
    assert len(calls) == 2 and outputs(tmp_path / "resumed") == full
    # a test image with other bytes: only its chunk is recomputed
    calls.clear()
    f = sorted((tmp_path / "user_set").rglob("*.png"))[-1]
    Image.open(f).rotate(90).save(f)
    assert run("changed") == 0 and len(calls) == 1
