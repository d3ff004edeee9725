"""The headline figures of a run, metrics/summary.json: one small dict that `dvc metrics show
metrics/summary.json` and `dvc exp show` fit on a screen.

Pure: the dicts of metrics/dataset.json, metrics/eval.json and metrics/concepts.json in, the summary
out. No other metrics file starts a key with its top-level names (size, funnel, concept_bank, covered,
top1), so DVC shows them unprefixed and a `dvc exp show --keep` regex of them selects them (README).
"""

from __future__ import annotations

from typing import Any, Mapping

FUNNEL = ("retrieve", "generate", "dedup", "leakage", "ood", "prune")   # pipeline order


def summarize(dataset: Mapping[str, Any], evaluation: Mapping[str, Any], concepts: Mapping[str, Any]) -> dict:
    """size: final dataset (real / synthetic); funnel: images after each stage; concept_bank: |B| after L3
    validation; covered: fraction of each reference set's classes a concept covers (paper Fig. 4a);
    top1: kNN and linear-probe top-1 per eval set, pretrained vs the baseline backbone."""
    final = dataset.get("final", {})
    return {
        "size": {"total": final.get("n", 0), "real": final.get("real", 0), "synthetic": final.get("synthetic", 0)},
        "funnel": {s: dataset[s]["n"] for s in FUNNEL if s in dataset},
        "concept_bank": concepts.get("B_after_validation"),
        "covered": {ref: c["covered"] for ref, c in sorted(concepts.get("coverage", {}).items())},
        "top1": {name: {"knn": r["pretrained"]["knn_top1"], "knn_baseline": r["baseline"]["knn_top1"],
                        "linear": r["pretrained"]["linear_top1"], "linear_baseline": r["baseline"]["linear_top1"]}
                 for name, r in sorted(evaluation.get("sets", {}).items())},
    }
