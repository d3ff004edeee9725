"""Kneedle stop, Pareto prune selection, dataset export and the `prune` stage end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pas import params as pas_params
from pas.curate.knee import bin_curve, find_knee, front_curve, knee_stop
from pas.curate.export import export_dataset
from pas.curate.prune import METRICS, PruneParams, dataset_funnel, sample_grid_keys, select
from pas.io.manifest import read_metrics, read_parquet, write_parquet
from pas.io.shards import ShardWriter, encode_image, iter_samples
from pas.params import ParamsError
from tests.helpers import read_run

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- knee


def test_front_curve_hand_computed():
    ranks = np.array([1, 0, 0, 2, 1])
    vals = np.array([[4.0], [6.0], [8.0], [1.0], [2.0]])
    n, x, Y = front_curve(ranks, vals)
    assert n.tolist() == [2, 2, 1]
    assert x.tolist() == [2, 4, 5]
    assert Y[:, 0].tolist() == [7.0, 3.0, 1.0]


def test_bin_curve_hand_computed():
    # bins=2 over N=4: front x=1 -> bin 0, x=2 -> bin 0, x=4 -> bin 1
    xb, yb = bin_curve(np.array([1, 1, 2]), np.array([1, 2, 4]), np.array([3.0, 1.0, 0.0]), 2)
    assert xb.tolist() == [2, 4] and yb.tolist() == [2.0, 0.0]
    # weighted by images: fronts of 1 and 3 images in one bin
    xb, yb = bin_curve(np.array([1, 3]), np.array([1, 4]), np.array([4.0, 0.0]), 1)
    assert xb.tolist() == [4] and yb.tolist() == [1.0]
    xb, yb = bin_curve(np.array([1, 3]), np.array([1, 4]), np.array([4.0, 0.0]), 0)
    assert xb.tolist() == [1, 4] and yb.tolist() == [4.0, 0.0]


def _noisy_knee_curve(seed: int, sigma: float = 0.03):
    """2000 fronts of 50 images; mean score falls steeply to a knee at x0 = 20,000, then slowly."""
    rng = np.random.default_rng(seed)
    n = np.full(2000, 50)
    x = np.cumsum(n)
    N, x0 = x[-1], 20_000
    y = np.where(x <= x0, 1 - 0.8 * x / x0, 0.2 - 0.1 * (x - x0) / (N - x0))
    return n, x, y + sigma * rng.standard_normal(len(x)), x0, N


def _corner_scores():
    """200 images, each its own front (all three scores equal and strictly decreasing): x_k = k.

    y falls linearly 1 -> 0.1 over fronts 1..22, then 0.1 -> 0 over 23..200. kneedle (convex,
    decreasing) maximises D_k = (1 - y_n) - x_n with y_n = y, x_n = (k - 1)/199: for k <= 22,
    D_k = (k - 1)(0.9/21 - 1/199) rises; after it, each step adds 0.1/178 - 1/199 < 0, so the
    maximum is D_22 = 0.9 - 21/199 = 0.7945 and the knee is x = 22 images removed.
    """
    k = np.arange(1, 201)
    y = np.where(k <= 22, 1 - (k - 1) * 0.9 / 21, 0.1 - (k - 22) * 0.1 / 178)
    return pd.DataFrame({"key": [f"k{i:03d}" for i in k], "ood_b": y, "ood_bprime": y,
                         "ood_blur_delta": y})


def test_knee_on_the_per_front_curve_hand_computed():
    """Paper §3.3: kneedle on "a curve that represents the relationship between the average value of
    each metric at the i-th Pareto-front (Y-axis) and the cumulative number of images removed up to
    that point (X-axis)"; the default (knee_bins = 0) is that curve, and the stop is x = 22."""
    res = select(_corner_scores(), PruneParams())
    assert res.summary["fronts"] == 200 and res.summary["knee_bins"] == 0
    assert res.binned["removed"].tolist() == list(range(1, 201))      # kneedle saw every front
    assert res.summary["knee_x"] == {m: 22 for m in METRICS} and res.summary["stop_x"] == 22
    # 50 bins of 4 fronts: the corner falls inside bin 21..24, so binning moves the stop
    assert select(_corner_scores(), PruneParams(knee_bins=50)).summary["stop_x"] == 24


@pytest.mark.parametrize("preset", ["paper-food", "paper-birds"])
def test_paper_presets_stop_on_the_per_front_curve(preset):
    """The paper presets use "the average value of each metric at the i-th Pareto-front" unbinned."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
    p = pas_params.build(PruneParams, cfg, "prune")
    assert p.stop == "knee" and p.knee_bins == 0
    assert select(_corner_scores(), p).summary["stop_x"] == 22


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binning_finds_the_known_knee_where_raw_kneedle_fails(seed):
    n, x, y, x0, N = _noisy_knee_curve(seed)
    raw = find_knee(x, y)
    assert raw.x is not None and raw.x < x0 / 4            # spurious early knee on the dense curve
    xb, yb = bin_curve(n, x, y, 50)
    binned = find_knee(xb, yb)
    assert binned.reason == "knee" and abs(binned.x - x0) <= 0.05 * N
    res = knee_stop(n, x, np.stack([y, y, y], 1), ["a", "b", "c"], bins=50)
    assert res["reason"] == "knee" and abs(res["stop_x"] - x0) <= 0.05 * N
    assert res["stop_x"] == x[res["fronts"] - 1]             # whole fronts


def test_polynomial_interp_also_near_the_knee():
    n, x, y, x0, N = _noisy_knee_curve(0)
    k = find_knee(x, y, interp="polynomial")
    assert abs(k.x - x0) <= 0.1 * N


def test_knee_stop_takes_max_over_metrics():
    n, x, y, x0, N = _noisy_knee_curve(0, sigma=0.0)
    y_late = np.where(x <= 2 * x0, 1 - 0.8 * x / (2 * x0), 0.2 - 0.1 * (x - 2 * x0) / (N - 2 * x0))
    flat = np.full(len(x), 0.5)
    res = knee_stop(n, x, np.stack([y, y_late, flat], 1), ["early", "late", "flat"], bins=50)
    assert res["knees"]["flat"].reason == "flat"
    assert res["stop_x"] == res["knees"]["late"].x > res["knees"]["early"].x
    assert abs(res["stop_x"] - 2 * x0) <= 0.05 * N


def test_degenerate_curves():
    assert find_knee(np.array([1, 2]), np.array([1.0, 0.0])).reason == "too_few_points"
    assert find_knee(np.arange(1, 6), np.full(5, 0.3)).reason == "flat"
    assert find_knee(np.arange(1, 30), np.linspace(1, 0, 29)).reason == "no_knee"   # a straight line
    res = knee_stop(np.array([3]), np.array([3]), np.array([[0.5, 0.5, 0.5]]), METRICS)
    assert res == {**res, "stop_x": 0, "fronts": 0, "reason": "no_knee"}


# ------------------------------------------------------------------------------------- params


def test_params_validation():
    assert PruneParams().stop == "knee"
    with pytest.raises(ParamsError, match="stop"):
        PruneParams(stop="elbow")
    with pytest.raises(ParamsError, match="target_size"):
        PruneParams(stop="target_size")
    with pytest.raises(ParamsError, match="max_fronts"):
        PruneParams(stop="max_fronts")
    with pytest.raises(ParamsError, match="shard_size"):
        PruneParams(shard_size=20_000)
    with pytest.raises(ParamsError, match="knee_bins"):
        PruneParams(knee_bins=2)
    with pytest.raises(ParamsError, match="knee_interp"):
        PruneParams(knee_interp="spline")
    with pytest.raises(ParamsError, match="prune.target_size"):
        pas_params.build(PruneParams, {"prune": {"stop": "target_size", "target_size": -1}}, "prune")
    with pytest.raises(ParamsError, match="prune.bins"):
        pas_params.build(PruneParams, {"prune": {"bins": 3}}, "prune")
    p = pas_params.build(PruneParams, {"seed": 5, "prune": {"sample_fronts": [1, 2]}}, "prune")
    assert p.seed == 5 and p.sample_fronts == (1, 2)


# ----------------------------------------------------------------------------------- selection


def _scores(n: int, seed: int = 0, levels: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    v = rng.random((n, 3))
    if levels:
        v = np.round(v * (levels - 1)) / (levels - 1)
    keys = [f"k{i:05d}" for i in rng.permutation(n)]
    return pd.DataFrame({"key": keys, "ood_b": v[:, 0], "ood_bprime": v[:, 1],
                         "ood_blur_delta": v[:, 2], "text_boxes": np.zeros(n, np.int32)})


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 120), st.integers(0, 130), st.sampled_from([None, 2, 3]), st.integers(0, 99))
def test_target_size_is_exact_and_peels_worst_first(n, target, levels, seed):
    res = select(_scores(n, seed, levels), PruneParams(stop="target_size", target_size=target))
    t = res.table
    assert res.summary["n_kept"] == min(n, target) == int((~t["removed"]).sum())
    if target >= n:
        assert res.summary["stop_reason"] == "already_small"
        return
    removed_fronts, kept_fronts = t.loc[t.removed, "front"], t.loc[~t.removed, "front"]
    if len(removed_fronts) and len(kept_fronts):
        assert removed_fronts.max() <= kept_fronts.min()   # at most one front is split
    j = res.summary["partial_front"]
    if j is not None:            # split front: removed = a prefix of (score sum descending, key)
        f = t[t.front == j].assign(s=lambda d: d[list(METRICS)].sum(axis=1))
        f = f.sort_values(["s", "key"], ascending=[False, True], kind="stable")
        k = int(f.removed.sum())
        assert 0 < k < len(f) and f.removed.iloc[:k].all() and not f.removed.iloc[k:].any()


def test_target_size_deterministic_tie_break():
    df = pd.DataFrame({"key": ["c", "a", "b", "d"], "ood_b": [1.0, 1.0, 1.0, 0.0],
                       "ood_bprime": [0.0, 0.0, 0.0, 0.0], "ood_blur_delta": [0.0, 0.0, 0.0, 0.0]})
    # a, b, c tie in front 0 (same scores): the smallest keys go first
    for target, gone in ((3, ["a"]), (2, ["a", "b"]), (1, ["a", "b", "c"])):
        res = select(df, PruneParams(stop="target_size", target_size=target))
        assert res.table.loc[res.table.removed, "key"].tolist() == gone
        assert res.summary["partial_front"] == (0 if target > 1 else None)
        assert res.summary["fronts_removed"] == (0 if target > 1 else 1)


def test_max_fronts_mode_and_cap():
    df = _scores(400, 1)
    res = select(df, PruneParams(stop="max_fronts", max_fronts=3))
    t = res.table
    assert (t.removed == (t.front < 3)).all() and res.summary["fronts_removed"] == 3
    capped = select(df, PruneParams(stop="target_size", target_size=10, max_fronts=2))
    assert (capped.table.removed == (capped.table.front < 2)).all()
    assert capped.summary["stop_reason"] == "max_fronts"


def test_knee_mode_on_synthetic_scores():
    """Images whose scores fall steeply over the first fronts: the stop lands at the knee."""
    df = _scores(3000, 2)
    res = select(df, PruneParams(knee_bins=20))
    s = res.summary
    assert s["stop_reason"] == "knee" and 0 < s["n_removed"] < 3000
    assert s["stop_x"] == max(s["knee_x"].values())
    assert (res.table.removed == (res.table.front < s["fronts_removed"])).all()
    assert res.curve["removed"].iloc[-1] == 3000 and res.curve["n"].sum() == 3000


def test_knee_mode_degenerate_removes_nothing():
    df = pd.DataFrame({"key": list("abcd"), "ood_b": 0.5, "ood_bprime": 0.5, "ood_blur_delta": 0.0})
    res = select(df, PruneParams())
    assert res.summary["stop_reason"] == "no_knee" and res.summary["n_removed"] == 0
    assert res.summary["fronts"] == 1
    empty = select(df.iloc[:0], PruneParams())
    assert empty.summary["n_in"] == 0 and empty.summary["stop_reason"] == "empty"


def test_bad_scores_refused():
    df = _scores(5)
    with pytest.raises(ValueError, match="NaN/inf.*k"):
        select(df.assign(ood_b=[0.1, np.nan, 0.2, 0.3, 0.4]), PruneParams())
    with pytest.raises(ValueError, match="duplicate key"):
        select(pd.concat([df, df.iloc[:1]]), PruneParams())
    with pytest.raises(ValueError, match="lacks column"):
        select(df.drop(columns="ood_bprime"), PruneParams())


# ----------------------------------------------------------------------------- export + stage


def _make_images(root: Path, n_real: int, n_synth: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    dirs = []
    for name, n, src, prefix in (("retrieved", n_real, "real", "p"), ("generated", n_synth, "synthetic", "g")):
        d = root / name
        rows = []
        with ShardWriter(d, prefix="shard", maxcount=7) as w:
            for i in rng.permutation(n):             # not in key order
                key = f"{prefix}{i:04d}"
                img = Image.new("RGB", (24, 16), tuple(int(c) for c in rng.integers(0, 255, 3)))
                meta = {"source": src, "concepts": [f"dish {i % 3}"]} if src == "real" else \
                       {"source": src, "concept": f"dish {i % 3}", "caption": f"a photo of dish {i}"}
                w.write(key, encode_image(img, "png" if i % 2 else "jpg"), meta,
                        ext="png" if i % 2 else "jpg")
            rows = w.rows
        write_parquet(pd.DataFrame(rows), d / "index.parquet")
        dirs.append(d)
    return dirs[0], dirs[1]


def _scores_for(keys: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    v = rng.random((len(keys), 3))
    return pd.DataFrame({"key": keys, "source": ["real" if k[0] == "p" else "synthetic" for k in keys],
                         "ood_b": v[:, 0], "ood_bprime": v[:, 1], "ood_blur_delta": v[:, 2] - 0.5,
                         "text_boxes": rng.integers(0, 3, len(keys)).astype(np.int32)})


def _dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_export_streams_sorted_runs_and_refuses_missing(tmp_path):
    real, synth = _make_images(tmp_path, 20, 15)
    keys = [f"p{i:04d}" for i in range(18)] + [f"g{i:04d}" for i in range(15)]   # 2 real dropped upstream
    res = select(_scores_for(keys), PruneParams(stop="target_size", target_size=21))
    one = export_dataset([real, synth], res.table, tmp_path / "one", maxcount=5, progress=False)
    many = export_dataset([real, synth], res.table, tmp_path / "many", maxcount=5, buffer_bytes=300,
                          progress=False)
    assert one.n_runs == 0 and many.n_runs > 2
    assert _dir_bytes(tmp_path / "one") == _dir_bytes(tmp_path / "many")   # byte-identical
    samples = list(iter_samples(tmp_path / "one"))
    kept = sorted(res.table.loc[~res.table.removed, "key"])
    assert [s.key for s in samples] == kept                                 # key order, kept only
    assert len(list((tmp_path / "one").glob("*.tar"))) == 5                 # 21 images, 5 per shard
    s0 = samples[0]
    row = res.table.set_index("key").loc[s0.key]
    assert s0.meta["pareto_front"] == row.front and s0.meta["ood_b"] == pytest.approx(row.ood_b)
    assert s0.meta["source"] in ("real", "synthetic") and "text_boxes" in s0.meta
    idx = read_parquet(tmp_path / "one" / "index.parquet")
    assert idx["key"].tolist() == kept
    g = idx[idx.source == "synthetic"].iloc[0]
    assert g.caption == f"a photo of dish {int(g.key[1:])}"
    assert list(g.concepts) == [f"dish {int(g.key[1:]) % 3}"]
    assert one.sources_in == {"real": 20, "synthetic": 15}
    assert one.sources_scored == {"real": 18, "synthetic": 15}
    assert sum(one.sources_kept.values()) == 21

    bad = select(_scores_for(keys + ["p9999"]), PruneParams(stop="max_fronts", max_fronts=0))
    with pytest.raises(ValueError, match="not found.*p9999"):
        export_dataset([real, synth], bad.table, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_export_buffer_counts_images_json_and_bookkeeping(tmp_path):
    """sort_buffer_mb bounds what the sort buffer really holds: each kept sample's image, its encoded
    JSON and 32 bytes of bookkeeping (no Python object per sample). A buffer of exactly that total
    spills once (at the last sample), one byte more never; the shards are the same either way."""
    import tarfile

    real, synth = _make_images(tmp_path, 9, 6)
    keys = [f"p{i:04d}" for i in range(9)] + [f"g{i:04d}" for i in range(6)]
    res = select(_scores_for(keys), PruneParams(stop="target_size", target_size=10))
    ref = export_dataset([real, synth], res.table, tmp_path / "ref", maxcount=4, progress=False)
    held = 0
    for shard in sorted((tmp_path / "ref").glob("*.tar")):
        with tarfile.open(shard) as t:
            held += sum(m.size for m in t if m.isfile())
    held += 32 * len(ref.index)
    assert len(ref.index) == 10
    above = export_dataset([real, synth], res.table, tmp_path / "above", maxcount=4,
                           buffer_bytes=held + 1, progress=False)
    exact = export_dataset([real, synth], res.table, tmp_path / "exact", maxcount=4,
                           buffer_bytes=held, progress=False)
    assert (above.n_runs, exact.n_runs) == (0, 1)
    assert _dir_bytes(tmp_path / "exact") == _dir_bytes(tmp_path / "ref") == _dir_bytes(tmp_path / "above")
    pd.testing.assert_frame_equal(exact.index, ref.index)
    # a table not in key order (select sorts it; any caller may not): same dataset
    shuffled = res.table.sample(frac=1, random_state=0).reset_index(drop=True)
    assert not shuffled["key"].is_monotonic_increasing
    again = export_dataset([real, synth], shuffled, tmp_path / "shuffled", maxcount=4, buffer_bytes=held // 3,
                           progress=False)
    assert again.n_runs >= 2 and _dir_bytes(tmp_path / "shuffled") == _dir_bytes(tmp_path / "ref")
    pd.testing.assert_frame_equal(again.index, ref.index)



def test_export_shares_repeated_index_values_without_changing_bytes(tmp_path, monkeypatch):
    """The index keeps one object per distinct source / concepts list (json.loads makes one per
    sample): the shards, index.parquet and the returned index are those of a value per sample."""
    import pas.curate.export as E

    real, synth = _make_images(tmp_path, 12, 9)
    keys = [f"p{i:04d}" for i in range(12)] + [f"g{i:04d}" for i in range(9)]
    res = select(_scores_for(keys), PruneParams(stop="target_size", target_size=15))
    shared = export_dataset([real, synth], res.table, tmp_path / "shared", maxcount=4, progress=False)
    concepts = shared.index["concepts"].tolist()
    assert len({id(c) for c in concepts}) == len({tuple(c) for c in concepts}) < len(concepts)
    monkeypatch.setattr(E, "_shared", lambda memo, v: v)
    each = export_dataset([real, synth], res.table, tmp_path / "each", maxcount=4, progress=False)
    assert len({id(c) for c in each.index["concepts"]}) == len(concepts)
    assert _dir_bytes(tmp_path / "shared") == _dir_bytes(tmp_path / "each")
    pd.testing.assert_frame_equal(shared.index, each.index)


def test_dataset_funnel_reads_metrics(tmp_path):
    from collections import Counter
    (tmp_path / "dedup.json").write_text(json.dumps({"n_kept": 30, "by_source": {
        "real": {"n_in": 20, "n_kept": 17}, "synthetic": {"n_in": 15, "n_kept": 13}}}))
    (tmp_path / "leakage.json").write_text(json.dumps({"n_kept": 29}))
    f = dataset_funnel(tmp_path, Counter(real=20, synthetic=15), Counter(real=16, synthetic=13),
                       Counter(real=10, synthetic=5))
    assert f["retrieve"] == {"n": 20, "real": 20} and f["generate"] == {"n": 15, "synthetic": 15}
    assert f["dedup"] == {"n": 30, "real": 17, "synthetic": 13} and f["leakage"] == {"n": 29}
    assert f["ood"] == {"n": 29, "real": 16, "synthetic": 13}
    assert f["final"]["real_fraction"] == pytest.approx(10 / 15)
    g = dataset_funnel(tmp_path / "none", Counter(), Counter(), Counter())
    assert "dedup" not in g and g["final"]["real_fraction"] is None


def test_sample_grid_keys_seeded():
    t = select(_scores(500, 3), PruneParams()).table
    a = sample_grid_keys(t, (1, 10, 100000), 4, seed=0)
    assert set(a) == {1, 10} and all(len(v) <= 4 for v in a.values())
    assert all((t.set_index("key").loc[a[1], "front"] == 0))
    assert a == sample_grid_keys(t, (1, 10, 100000), 4, seed=0)


def _stage():
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        import prune as stage
    finally:
        sys.path.pop(0)
    return stage


def test_stage_main_end_to_end(tmp_path, monkeypatch):
    real, synth = _make_images(tmp_path / "data", 40, 30)
    keys = [f"p{i:04d}" for i in range(38)] + [f"g{i:04d}" for i in range(28)]
    write_parquet(_scores_for(keys, 1), tmp_path / "data/ood/scores.parquet")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/dedup.json").write_text(json.dumps({"n_kept": 67}))
    (tmp_path / "metrics/leakage.json").write_text(json.dumps({"n_kept": 66}))
    (tmp_path / "params.yaml").write_text(
        "seed: 0\nprune:\n  stop: knee\n  knee_bins: 10\n  shard_size: 16\n"
        "  sample_fronts: [1, 2, 100]\n  sample_per_front: 3\n")
    stage = _stage()

    def run(out: str) -> int:
        return stage.main([
            "--scores", str(tmp_path / "data/ood/scores.parquet"), "--images", str(real), str(synth),
            "--metrics-dir", str(tmp_path / "metrics"), "--out", str(tmp_path / out / "dataset"),
            "--prune-dir", str(tmp_path / out / "prune"), "--metrics", str(tmp_path / out / "prune.json"),
            "--dataset-metrics", str(tmp_path / out / "dataset.json"),
            "--params", str(tmp_path / "params.yaml"), "--no-progress"])

    assert run("a") == 0 and run("b") == 0
    a = tmp_path / "a"
    m = read_metrics(a / "prune.json")
    assert m["n_in"] == 66 and m["n_kept"] + m["dropped"].get("pareto", 0) == 66
    assert m["stop"] == "knee" and m["stop_reason"] in ("knee", "no_knee")
    assert sum(by["n_kept"] for by in m["by_source"].values()) == m["n_kept"]
    idx = read_parquet(a / "dataset/index.parquet")
    assert len(idx) == m["n_kept"] and idx["key"].is_monotonic_increasing
    assert set(idx.columns) >= {"key", "shard", "source", "concepts", "caption", "ood_b", "ood_bprime",
                                "ood_blur_delta", "front"}
    assert len(list((a / "dataset").glob("*.tar"))) == -(-m["n_kept"] // 16)
    from pas.io.shards import shard_sha256   # readers check each shard against its stored digest
    assert list(idx["shard_sha256"]) == [shard_sha256(a / "dataset" / s) for s in idx["shard"]]
    ranks = read_parquet(a / "prune/ranks.parquet")
    assert len(ranks) == 66 and ranks["removed"].sum() == m["dropped"].get("pareto", 0)
    peel = pd.read_csv(a / "prune/peel.csv")
    assert peel["removed"].iloc[-1] == 66 and list(peel.columns[:3]) == ["front", "n", "removed"]
    knees = pd.read_csv(a / "prune/knees.csv")
    assert list(knees.columns) == ["metric", "removed", "value"]
    for png in ("peel.png", "removed_samples.png"):
        with Image.open(a / "prune" / png) as im:
            assert im.format == "PNG" and im.width > 100
    f = read_metrics(a / "dataset.json")
    assert f["retrieve"]["n"] == 40 and f["generate"]["n"] == 30 and f["dedup"]["n"] == 67
    assert f["ood"]["n"] == 66 and f["prune"]["n"] == m["n_kept"]
    # same inputs and params -> same bytes, tracked metrics included (timings go to the run log)
    b = tmp_path / "b"
    for f in ("prune.json", "dataset.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert read_run(a / "prune.json")["seconds"] > 0
    assert _dir_bytes(a / "dataset") == _dir_bytes(b / "dataset")
    assert _dir_bytes(a / "prune") == _dir_bytes(b / "prune")


def test_stage_main_bad_input_exits_cleanly(tmp_path, monkeypatch, caplog):
    (tmp_path / "params.yaml").write_text("prune:\n  stop: target_size\n")
    stage = _stage()
    assert stage.main(["--params", str(tmp_path / "params.yaml"), "--scores", "nope.parquet"]) == 2
    assert "target_size" in caplog.text
    (tmp_path / "params.yaml").write_text("prune: {}\n")
    assert stage.main(["--params", str(tmp_path / "params.yaml"),
                       "--scores", str(tmp_path / "nope.parquet")]) == 2
    assert "no such scores file" in caplog.text
    empty = tmp_path / "scores.parquet"           # ood scored nothing: refused, not an empty dataset
    _scores_for([]).to_parquet(empty)
    for d in ("retrieved", "generated"):
        (tmp_path / d).mkdir()
    assert stage.main(["--params", str(tmp_path / "params.yaml"), "--scores", str(empty),
                       "--images", str(tmp_path / "retrieved"), str(tmp_path / "generated"),
                       "--out", str(tmp_path / "ds")]) == 2
    assert "no scored images" in caplog.text and not (tmp_path / "ds").exists()


def test_export_empty_selection(tmp_path):
    real, synth = _make_images(tmp_path, 3, 2)
    res = select(_scores_for([]), PruneParams())
    rep = export_dataset([real, synth], res.table, tmp_path / "out", progress=False)
    assert len(rep.index) == 0 and rep.sources_in == {"real": 3, "synthetic": 2}
    assert not list((tmp_path / "out").glob("*.tar"))
    assert len(read_parquet(tmp_path / "out" / "index.parquet")) == 0
