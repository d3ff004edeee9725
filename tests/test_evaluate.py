"""evaluate: kNN by hand and vs brute force, the linear probe on separable data, metrics/eval.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pas.params import build
from pas.train.evalsets import EvalSetSpec, write_evalset
from pas.train.evaluate import EvalParams, accuracy, evaluate, knn_predict, linear_probe, probe_optimizer
from tests.stage_helpers import load_stage
from tests.train_helpers import TINY_PRETRAIN, TINY_VIT, image_folder, synthetic_shards, tiny_backbone_init, write_params

ROOT = Path(__file__).resolve().parents[1]


def _unit(deg):
    return np.array([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in deg], np.float32)


def test_knn_known_answer():
    # training points on the unit circle at 0°, 10°, 20° (class 0) and 90°, 100° (class 1); test at 50°, 60°
    train = _unit([0, 10, 20, 90, 100])
    y = np.array([0, 0, 0, 1, 1])
    test = _unit([50, 60, 175])
    # k=1: 50° is 30° from 20° and 40° from 90° -> 0; 60° is 30° from 90° -> 1; 175° is nearest 100° -> 1
    assert knn_predict(train, y, test, 2, k=1).tolist() == [0, 1, 1]
    # k=3 majority: 60° has neighbours 90°, 100° (class 1) and 20° (class 0) -> 1; 50° has 20°, 90°, 10° -> 0
    assert knn_predict(train, y, test, 2, k=3).tolist() == [0, 1, 1]
    # magnitudes do not matter (cosine)
    assert knn_predict(train * 7, y, test * 0.1, 2, k=1).tolist() == [0, 1, 1]
    # k=5 uniform: class 0 wins 3-2 everywhere; dino weighting with a small T lets the two close class-1
    # neighbours of 60° outvote three far class-0 ones
    assert knn_predict(train, y, test, 2, k=5).tolist() == [0, 0, 0]
    assert knn_predict(train, y, test, 2, k=5, weighting="dino", temperature=0.05).tolist()[1:] == [1, 1]
    assert accuracy(np.array([0, 1, 1]), np.array([0, 1, 0])) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k,weighting", [(1, "uniform"), (4, "uniform"), (5, "dino")])
def test_knn_matches_brute_force(seed, k, weighting):
    rng = np.random.default_rng(seed)
    tr, te = rng.normal(size=(40, 6)), rng.normal(size=(17, 6))
    y = rng.integers(0, 3, 40)
    got = knn_predict(tr, y, te, 3, k=k, weighting=weighting, temperature=0.1, chunk=5)
    trn = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    for i, q in enumerate(te / np.linalg.norm(te, axis=1, keepdims=True)):
        sims = sorted(((float(q @ t), j) for j, t in enumerate(trn)), key=lambda s: (-s[0], s[1]))[:k]
        votes = [0.0, 0.0, 0.0]
        for s, j in sims:
            votes[y[j]] += 1.0 if weighting == "uniform" else math.exp(s / 0.1)
        # lightly breaks ties in its own order: the prediction is one of the classes with the most votes
        assert votes[got[i]] == pytest.approx(max(votes)), i


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_linear_probe_separates_separable_data(optimizer):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.1, 10, 16)                              # badly scaled features
    means = 4.0 * np.eye(16)[:4]                                  # 4 classes, margin >> noise
    y = rng.integers(0, 4, 600)
    x = (means[y] + 0.5 * rng.normal(size=(600, 16))) * scale
    # linearly separable by construction: x/scale·means_c is largest for the true class (checked here)
    assert np.array_equal(((x / scale) @ means.T).argmax(1), y)
    x_tr, y_tr, x_te, y_te = x[:400], y[:400], x[400:], y[400:]
    pred = linear_probe(x_tr, y_tr, x_te, 4, epochs=30, optimizer=optimizer, batch_size=64, seed=0)
    assert accuracy(pred, y_te) >= 0.95
    again = linear_probe(x_tr, y_tr, x_te, 4, epochs=30, optimizer=optimizer, batch_size=64, seed=0)
    assert np.array_equal(pred, again)                              # seeded


def test_probe_schedules_follow_the_paper():
    w = [torch.nn.Parameter(torch.zeros(2))]
    opt, sched = probe_optimizer(w, "sgd", None, 0.0, epochs=100, steps_per_epoch=2)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    epoch_lr = lrs[::2]   # LR x0.1 at epochs 60 and 80
    assert epoch_lr[59] == pytest.approx(0.1) and epoch_lr[60] == pytest.approx(0.01)
    assert epoch_lr[79] == pytest.approx(0.01) and epoch_lr[80] == pytest.approx(0.001)
    opt, sched = probe_optimizer(w, "adamw", 0.5, 0.0, epochs=10, steps_per_epoch=1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[5] == pytest.approx(0.25) and all(a > b for a, b in zip(lrs, lrs[1:]))


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    init = tiny_backbone_init(root / "init")
    folder = image_folder(root / "folder", {"red": 8, "green": 8, "blue": 8})
    spec = {"name": "toy", "kind": "imagefolder", "path": str(folder), "n_test": 3, "min_per_class": 5}
    write_evalset(EvalSetSpec.from_dict(spec), root / "evalsets", max_side=40, progress=False)
    from pas.train.pretrain import PretrainParams, pretrain

    shards = synthetic_shards(root / "ds", 16)
    cfg = build(PretrainParams, {"seed": 0, "pretrain": {**TINY_PRETRAIN, "epochs": 1, "warmup_epochs": 0}},
                "pretrain")
    pretrain(cfg, shards, init, root / "backbone", root / "ckpt", progress=False)
    return root, spec


def _check_schema(m: dict, names: list[str]) -> None:
    assert {"backbone", "image_size", "baseline", "pretrain_images", "pretrain_forward_passes", "sets"} <= set(m)
    assert sorted(m["sets"]) == sorted(names)
    for s in m["sets"].values():
        assert {"n_train", "n_test", "n_classes", "pretrained", "baseline", "gain_knn_top1", "gain_linear_top1"} <= set(s)
        for which in ("pretrained", "baseline"):
            assert set(s[which]) == {"knn_top1", "linear_top1"}
            assert all(0.0 <= v <= 1.0 for v in s[which].values())
        assert s["gain_knn_top1"] == pytest.approx(s["pretrained"]["knn_top1"] - s["baseline"]["knn_top1"])


def test_evaluate_metrics_schema(eval_env):
    root, spec = eval_env
    cfg = build(EvalParams, {"seed": 0, "eval": {"sets": [spec], "linear_epochs": 5, "threads": 1}}, "eval")
    m = evaluate(cfg, root / "backbone", root / "init", root / "evalsets", progress=False)
    _check_schema(m, ["toy"])
    toy = m["sets"]["toy"]
    assert (toy["n_train"], toy["n_test"], toy["n_classes"]) == (15, 9, 3)
    assert m["pretrain_images"] == 16 and m["pretrain_forward_passes"] == 2 * 16
    assert m["linear_optimizer"] == "adamw" and m["baseline"] == "random_init"
    # a user checkpoint as baseline: the pretrained weights themselves -> zero gain
    cfg = build(EvalParams, {"eval": {"sets": [spec], "linear_epochs": 5, "threads": 1,
                                      "baseline_checkpoint": str(root / "backbone")}}, "eval")
    m = evaluate(cfg, root / "backbone", root / "init", root / "evalsets", progress=False)
    assert m["sets"]["toy"]["gain_knn_top1"] == 0 and m["sets"]["toy"]["gain_linear_top1"] == 0
    missing = build(EvalParams, {"eval": {"sets": [{**spec, "name": "absent"}]}}, "eval")
    with pytest.raises(FileNotFoundError, match="evalsets"):
        evaluate(missing, root / "backbone", root / "init", root / "evalsets", progress=False)


def test_stage_main(eval_env, tmp_path):
    root, spec = eval_env
    params = write_params(tmp_path / "params.yaml", eval={"sets": [spec], "linear_epochs": 3, "knn_k": 3,
                                                          "threads": 1}, models={"backbone_init": TINY_VIT})
    mod = load_stage("evaluate")
    argv = ["--backbone", str(root / "backbone"), "--init", str(root / "init"), "--evalsets",
            str(root / "evalsets"), "--params", str(params), "--metrics", str(tmp_path / "eval.json"),
            "--plot", str(tmp_path / "accuracy.csv")]     # never the repository's data/evaluate/
    assert mod.main(argv) == 0
    m = json.loads((tmp_path / "eval.json").read_text())
    _check_schema(m, ["toy"])
    assert m["knn_k"] == 3 and m["linear_epochs"] == 3
    assert (tmp_path / "accuracy.csv").read_text().splitlines()[0] == "run,top1"
