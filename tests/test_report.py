"""The run report (pas.report): every section from a tiny hand-made run, same bytes twice, sections
with missing inputs say so, bad input is one line, the images it reads are only those it shows, and
(where Chromium is installed) the page renders in a real headless browser with its images."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pas.io.manifest import write_metrics, write_parquet
from pas.io.shards import ShardWriter, encode_image, write_index
from pas.params import ParamsError, build
from pas.report import Inputs, ReportParams, build_report, near_misses, read_images
from pas.summary import summarize
from tests.stage_helpers import load_stage, outputs

THUMB_RGB = (250, 0, 120)      # the colour of every collected image: no CSS or plot uses it
CONCEPTS = ["apple pie", "bread", "cheese <b>"]     # one with markup: it must come out escaped


def _shards(d: Path, items: list[tuple[str, dict]], prefix: str, extra: dict[str, dict] | None = None,
            size=(40, 30)) -> None:
    with ShardWriter(d, prefix=prefix, maxcount=7) as w:
        for key, meta in items:
            w.write(key, encode_image(Image.new("RGB", size, THUMB_RGB)), meta)
        rows = w.rows
    df = pd.DataFrame(rows)
    for col in sorted({c for v in (extra or {}).values() for c in v}):
        df[col] = [(extra or {}).get(k, {}).get(col) for k in df["key"]]
    write_index(df, d)


def make_run(root: Path) -> Path:
    """A run's outputs in the pipeline's layout: 12 retrieved + 6 generated images, one duplicate
    pair, one leak, three Pareto fronts (the worst removed), metrics of every stage."""
    real = [f"p{i:04d}" for i in range(12)]
    synth = [f"g{i:04d}" for i in range(6)]
    allk = sorted(real + synth)
    data, m = root / "data", root / "metrics"
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({
        "seed": 0, "lambda_1": 0.1, "lambda_2": 0.1, "lambda_dup": 0.95, "lambda_leak": 0.9,
        "domain": {"name": "food", "description": "dishes"},
        "report": {"concepts": 2, "per_concept": 3, "pairs": 2, "ood_extremes": 2, "dedup_groups": 2,
                   "dataset_samples": 6, "thumb": 48, "fronts": [1, 2, 99]}}))
    # concepts
    write_parquet(pd.DataFrame({"concept": CONCEPTS + ["car"], "first_iteration": [0, 0, 1, 1],
                                "origin": [None, None, "bread", "bread"],
                                "generation_sample": pd.array([1, 1, None, None], "Int64"),
                                "score": [0.6, 0.5, 0.4, 0.1], "accepted": [True, True, True, False]}),
                  data / "concepts/bank.parquet", sort_by="concept")
    (data / "concepts/history.json").write_text(json.dumps({
        "generation": [{"n": 1, "new": 2, "size": 2}, {"n": 2, "new": 0, "size": 2}],
        "expansion": [{"round": 0, "new": None, "size": 2}, {"round": 1, "new": 2, "size": 4}]}))
    # retrieve + generate
    _shards(data / "retrieved", [(k, {"source": "real"}) for k in real], "retrieved")
    write_parquet(pd.DataFrame([{"concept": c, "rank": r, "key": real[(3 * i + r) % 12], "similarity": 0.3 - r / 100}
                                for i, c in enumerate(CONCEPTS) for r in range(4)]),
                  data / "retrieved/hits.parquet", sort_by=None)
    gen_meta = {k: {"source": "synthetic", "concept": CONCEPTS[i % 3], "caption_idx": i // 3, "image_idx": 0,
                    "caption": f"a photo of {CONCEPTS[i % 3]}"} for i, k in enumerate(synth)}
    _shards(data / "generated", [(k, {"source": "synthetic"}) for k in synth], "generated", gen_meta)
    # dedup: p0000 + p0001 one group, p0000 kept
    src = {k: "real" if k[0] == "p" else "synthetic" for k in allk}
    comp = {k: i for i, k in enumerate(allk)}
    comp["p0001"] = comp["p0000"]
    write_parquet(pd.DataFrame({
        "key": allk, "source": [src[k] for k in allk], "kept": [k != "p0001" for k in allk],
        "reason": ["duplicate" if k == "p0001" else "" for k in allk],
        "score": np.array([0.99 if k in ("p0000", "p0001") else 0.5 + i / 100 for i, k in enumerate(allk)], np.float32),
        "component": [comp[k] for k in allk], "component_size": [2 if k in ("p0000", "p0001") else 1 for k in allk],
        "representative": ["p0000" if k == "p0001" else k for k in allk]}), data / "dedup/manifest.parquet")
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(len(allk), 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    np.save(data / "dedup/descriptors.npy", desc)
    write_parquet(pd.DataFrame({"row": np.arange(len(allk)), "key": allk, "source": [src[k] for k in allk]}),
                  data / "dedup/keys.parquet", sort_by="row")
    # leakage: p0002 matches test image e0001
    tests = [f"e{i:04d}" for i in range(3)]
    _shards(data / "evalsets/toy/test", [(k, {"source": "real"}) for k in tests], "test",
            {k: {"label": i, "label_name": f"class{i}"} for i, k in enumerate(tests)})
    write_parquet(pd.DataFrame({
        "key": allk, "kept": [k not in ("p0002", "p0001") for k in allk],
        "reason": ["leak" if k == "p0002" else "" for k in allk],
        "score": np.array([0.95 if k == "p0002" else 0.3 + i / 100 for i, k in enumerate(allk)], np.float32),
        "nearest_key": [tests[i % 3] if k != "p0002" else "e0001" for i, k in enumerate(allk)],
        "evalset": ["toy"] * len(allk), "n_matches": [int(k == "p0002") for k in allk],
        "component": [comp[k] for k in allk], "dedup_kept": [k != "p0001" for k in allk]}),
        data / "leakage/checked.parquet")
    kept = [k for k in allk if k not in ("p0001", "p0002")]
    write_parquet(pd.DataFrame({"key": [k for k in allk if k != "p0001"],
                                "kept": [k != "p0002" for k in allk if k != "p0001"]}), data / "leakage/manifest.parquet")
    # ood + prune: fronts by position, the worst front (0) removed; p0003 has a text box
    v = np.random.default_rng(1).random((len(kept), 3))
    scores = pd.DataFrame({"key": kept, "source": [src[k] for k in kept], "ood_b": v[:, 0],
                           "ood_bprime": v[:, 1], "ood_blur_delta": v[:, 2] - 0.5,
                           "text_boxes": np.array([int(k == "p0003") for k in kept], np.int32)})
    write_parquet(scores, data / "ood/scores.parquet")
    front = np.arange(len(kept)) % 3
    write_parquet(scores.assign(front=front, removed=front == 0), data / "prune/ranks.parquet")
    (data / "prune/knees.csv").write_text("metric,removed,value\nood_b,6,0.4\n")
    Image.new("RGB", (60, 40), (0, 0, 255)).save(data / "prune/peel.png")
    final = [k for k, f in zip(kept, front) if f != 0]
    _shards(data / "dataset", [(k, {"source": src[k]}) for k in final], "shard",
            {k: {"source": src[k], "concepts": [CONCEPTS[0]], "caption": "c"} for k in final})
    # metrics
    funnel = {"retrieve": {"n": 12, "real": 12}, "generate": {"n": 6, "synthetic": 6},
              "dedup": {"n": 17, "real": 11, "synthetic": 6}, "leakage": {"n": 16, "real": 10, "synthetic": 6},
              "ood": {"n": 16, "real": 10, "synthetic": 6},
              "prune": {"n": len(final), "real": sum(src[k] == "real" for k in final),
                        "synthetic": sum(src[k] == "synthetic" for k in final)}}
    funnel["final"] = dict(funnel["prune"])
    evaluation = {"backbone": "vit_tiny", "baseline": "random_init", "sets": {"toy": {
        "n_train": 9, "n_test": 3, "n_classes": 3, "gain_knn_top1": 0.1, "gain_linear_top1": 0.0,
        "pretrained": {"knn_top1": 0.5, "linear_top1": 0.4}, "baseline": {"knn_top1": 0.4, "linear_top1": 0.4}}}}
    concepts = {"B0": 2, "B_before_validation": 4, "B_after_validation": 3, "generation_stop": "lambda_1",
                "expansion_stop": "max_expansion_rounds", "stopped_by_cap": ["expansion"], "validator": "embedding",
                "coverage": {"food101": {"covered": 0.25}}}
    for name, d in {"dataset": funnel, "eval": evaluation, "concepts": concepts,
                    "summary": summarize(funnel, evaluation, concepts),
                    "dedup": {"n_in": 18, "n_kept": 17, "components_gt1": 1},
                    "leakage": {"n_checked": 18, "n_test": {"toy": 3}, "n_in": 17, "n_kept": 16,
                                "scope": "component"},
                    "ood": {"mode": "negative_prompts", "n_with_text": 1},
                    "prune": {"n_in": 16, "fronts": 3, "fronts_removed": 1, "stop": "knee", "stop_reason": "knee",
                              "knee_reason": {"ood_b": "knee"}},
                    "precision": {"domain_categories": ["food"], "retrieve": {"domain_precision": 0.5}},
                    "pretrain": {"method": "mocov3"}}.items():
        write_metrics(m / f"{name}.json", d)
    return root


@pytest.fixture()
def run_root(tmp_path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture()
def no_detector(monkeypatch):
    # the real DBNet is tested in test_textblur; here one fixed box per image that has text
    import pas.report

    monkeypatch.setattr(pas.report, "_detector",
                        lambda params: lambda im: np.array([[[2, 2], [20, 2], [20, 12], [2, 12]]], np.float32))


def test_every_section_and_same_bytes_twice(run_root, tmp_path, no_detector):
    res = build_report(run_root, tmp_path / "a")
    assert res.missing == {}
    page = res.index.read_text()
    for sid in ("summary", "funnel", "concepts", "collected", "dedup", "leakage", "ood", "prune", "dataset", "eval"):
        assert f"<section id='{sid}'>" in page
    assert sorted(p.name for p in res.figures) == ["concepts.png", "funnel.png", "peel.png"]
    for f in res.figures:                           # linked relatively, so the folder opens anywhere
        assert f"src='{f.name}'" in page and f.parent == tmp_path / "a"
    assert str(run_root) not in page and str(tmp_path) not in page
    assert "<script" not in page and "http" not in page     # static, nothing fetched
    assert "cheese &lt;b&gt;" in page and "cheese <b>" not in page
    # the funnel table is in pipeline order, not the key order of metrics/dataset.json
    order = [page.index(f"<td>{s}</td>") for s in ("retrieve", "generate", "dedup", "leakage", "ood", "prune")]
    assert order == sorted(order)
    assert "group " in page and "e0001" in page and "class1" in page      # dedup group; the leak's test image
    assert res.n_images == page.count("data:image/jpeg;base64,")
    build_report(run_root, tmp_path / "b")
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")


def test_the_stage_deps_are_exactly_what_it_reads(run_root, tmp_path, no_detector):
    deps = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]["report"]["deps"]
    data_deps = [d for d in deps if d.startswith(("data/", "metrics/")) and d != "data/params.ok"]
    assert sorted(data_deps) == sorted(Inputs().files())
    # a root holding only those paths (and params.yaml) gives the whole report
    only = tmp_path / "only"
    for rel in Inputs().files() + ["params.yaml"]:
        src, dst = run_root / rel, only / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    a, b = build_report(only, tmp_path / "a"), build_report(run_root, tmp_path / "b")
    assert a.missing == {} and outputs(tmp_path / "a") == outputs(tmp_path / "b")


def test_sections_with_missing_inputs_say_so(run_root, tmp_path, no_detector):
    (run_root / "metrics/eval.json").unlink()
    shutil.rmtree(run_root / "data/dedup")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/concepts.png").write_bytes(b"stale")
    shutil.rmtree(run_root / "data/concepts")
    res = build_report(run_root, tmp_path / "out")
    assert res.missing == {"concepts": "data/concepts/bank.parquet", "collected": "data/concepts/bank.parquet",
                           "dedup": "data/dedup/manifest.parquet", "eval": "metrics/eval.json"}
    page = res.index.read_text()
    assert "Not available: metrics/eval.json is missing" in page
    assert not (tmp_path / "out/concepts.png").exists()        # no stale figure of an earlier run


def test_read_images_reads_only_the_keys_asked(run_root):
    d = [run_root / "data/retrieved", run_root / "data/generated"]
    got = read_images(d, ["p0003", "g0002", "nope"])
    assert sorted(got) == ["g0002", "p0003"]
    assert Image.open(__import__("io").BytesIO(got["p0003"])).size == (40, 30)
    assert read_images(d, []) == {}


def test_near_misses_match_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = [0, 7, 49]
    got = near_misses(x, rows, chunk=16)                       # several chunks
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    for r, a, cos in got:
        assert a == int(sims[r].argmax()) and cos == pytest.approx(float(sims[r].max()), abs=1e-6)


def test_bad_params_and_bad_input_are_one_line(run_root, tmp_path, caplog):
    with pytest.raises(ParamsError, match="thumb"):
        build(ReportParams, {"report": {"thumb": 4}}, section="report")
    stage = load_stage("report")
    (run_root / "data/ood/scores.parquet").write_bytes(b"not parquet")
    rc = stage.main(["--root", str(run_root), "--out", str(tmp_path / "out"),
                     "--params", str(run_root / "params.yaml")])
    assert rc == 2 and "scores.parquet: unreadable parquet" in caplog.text


def test_stage_main(run_root, tmp_path, no_detector):
    stage = load_stage("report")
    assert stage.main(["--root", str(run_root), "--out", str(tmp_path / "out"),
                       "--params", str(run_root / "params.yaml")]) == 0
    assert (tmp_path / "out/index.html").is_file() and (tmp_path / "out/funnel.png").is_file()


def test_peel_plot_is_matplotlib_with_the_same_bytes_twice(tmp_path):
    from pas.curate.prune_plots import plot_peel

    x = np.array([3, 7, 12, 20, 30], float)
    curves = {"ood_b": np.array([.9, .8, .5, .45, .4]), "ood_bprime": np.array([.8, .7, .6, .5, .45])}
    for name in ("a.png", "b.png"):
        plot_peel(x, curves, x, curves, {"ood_b": (12, .5), "ood_bprime": (None, None)}, 12, tmp_path / name,
                  title="t")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.width >= 800 and "Software" not in im.info
        a = np.asarray(im.convert("RGB"))
    assert (np.abs(a.astype(int) - (214, 39, 40)).sum(-1) < 40).sum() > 20      # the knee, in red


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow    # a browser start: 3-5 s here, 25 s on a loaded machine
@pytest.mark.skipif(_chromium() is None, reason="no Chromium on PATH (CI has none; see README 'Run report')")
def test_renders_in_headless_chromium(run_root, tmp_path, no_detector):
    res = build_report(run_root, tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,3000", f"--screenshot={shot}", res.index.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    a = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50                           # not blank
    near = lambda rgb: int((np.abs(a - rgb).sum(-1) < 40).sum())           # noqa: E731
    assert near(THUMB_RGB) > 1000            # the inline base64 thumbnails were drawn
    assert near((0x1f, 0x77, 0xb4)) > 1000   # funnel.png, a relative link, was loaded (its "real" bars)
    assert near((0, 0, 255)) > 500           # peel.png, copied beside index.html
