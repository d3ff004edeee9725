"""metrics/summary.json: the headline figures, from the metrics of prune, evaluate and concepts."""

from __future__ import annotations

import json
import logging

from pas.io.manifest import read_metrics, write_metrics
from pas.summary import summarize, summary_text
from tests.stage_helpers import load_stage

DATASET = {"retrieve": {"n": 40, "real": 40}, "generate": {"n": 30, "synthetic": 30},
           "dedup": {"n": 67, "real": 38, "synthetic": 29}, "leakage": {"n": 66, "real": 37, "synthetic": 29},
           "ood": {"n": 66, "real": 37, "synthetic": 29}, "prune": {"n": 50, "real": 25, "synthetic": 25},
           "final": {"n": 50, "real": 25, "synthetic": 25, "real_fraction": 0.5}}
EVAL = {"backbone": "vit_tiny", "knn_k": 1, "sets": {
    "food": {"pretrained": {"knn_top1": 0.4, "linear_top1": 0.5}, "baseline": {"knn_top1": 0.3, "linear_top1": 0.45},
             "gain_knn_top1": 0.1, "gain_linear_top1": 0.05, "n_train": 9, "n_test": 5, "n_classes": 2}}}
CONCEPTS = {"B0": 5, "B_after_validation": 12, "rejected": 3,
            "coverage": {"food101": {"classes": 101, "covered": 0.25, "mean_max_similarity": 0.6}}}


def test_summary_holds_the_headline_figures_only():
    assert summarize(DATASET, EVAL, CONCEPTS) == {
        "size": {"total": 50, "real": 25, "synthetic": 25},
        "funnel": {"retrieve": 40, "generate": 30, "dedup": 67, "leakage": 66, "ood": 66, "prune": 50},
        "concept_bank": 12,
        "covered": {"food101": 0.25},
        "top1": {"food": {"knn": 0.4, "knn_baseline": 0.3, "linear": 0.5, "linear_baseline": 0.45}},
    }


def test_summary_of_a_run_without_eval_sets_or_synthetic_images():
    s = summarize({"retrieve": {"n": 4, "real": 4}, "final": {"n": 3, "real": 3}}, {"sets": {}}, {})
    assert s == {"size": {"total": 3, "real": 3, "synthetic": 0}, "funnel": {"retrieve": 4},
                 "concept_bank": None, "covered": {}, "top1": {}}


def test_summary_with_domain_precision_and_its_printed_lines():
    prec = {"pool": {"domain_precision": 0.044}, "retrieve": {"domain_precision": 0.238},
            "final": {"domain_precision": 0.215}, "domain_categories": ["food"]}
    s = summarize(DATASET, EVAL, CONCEPTS, prec)
    assert s["domain_precision"] == {"pool": 0.044, "retrieve": 0.238, "final": 0.215}
    # write_metrics sorts keys: the printed funnel is still in pipeline order
    text = summary_text(json.loads(json.dumps(s, sort_keys=True)), "data/dataset", report=None)
    assert text.splitlines() == [
        "pas: data/dataset: 50 images (25 real, 25 synthetic) from 12 concepts",
        "  funnel: retrieve 40 → generate 30 → dedup 67 → leakage 66 → ood 66 → prune 50",
        "  domain precision: pool 0.044, retrieve 0.238, final 0.215",
        "  food: kNN top-1 0.400 (baseline 0.300), linear 0.500 (baseline 0.450)",
        "  card: data/dataset/README.md; all figures: dvc metrics show"]


def test_stage_main(tmp_path, capsys, caplog):
    for name, m in (("dataset", DATASET), ("eval", EVAL), ("concepts", CONCEPTS)):
        write_metrics(tmp_path / f"{name}.json", m)
    argv = ["--dataset", str(tmp_path / "dataset.json"), "--eval", str(tmp_path / "eval.json"),
            "--concepts", str(tmp_path / "concepts.json"), "--out", str(tmp_path / "summary.json")]
    stage = load_stage("summary")
    with caplog.at_level(logging.INFO):
        assert stage.main(argv) == 0
    assert read_metrics(tmp_path / "summary.json") == json.loads(json.dumps(summarize(DATASET, EVAL, CONCEPTS)))
    assert "kNN top-1 0.400 (baseline 0.300)" in capsys.readouterr().out
    (tmp_path / "eval.json").unlink()
    assert stage.main(argv) == 2 and "eval.json" in caplog.text
