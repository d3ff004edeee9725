"""The headline figures of a run, metrics/summary.json: one small dict that `dvc metrics show
metrics/summary.json` and `dvc exp show` fit on a screen.

Pure: the dicts of metrics/dataset.json, metrics/eval.json, metrics/concepts.json (and
metrics/precision.json) in, the summary out. No other metrics file starts a key with its top-level names
(size, funnel, concept_bank, covered, top1, domain_precision), so DVC shows them unprefixed and a
`dvc exp show --keep` regex of them selects them (README); `summary_text` is the same as printed lines.
"""

from __future__ import annotations

from typing import Any, Mapping

FUNNEL = ("retrieve", "generate", "dedup", "leakage", "ood", "prune")   # pipeline order
PRECISION = ("pool", "retrieve", "final")   # domain precision: before, after retrieval, of the dataset


def summarize(dataset: Mapping[str, Any], evaluation: Mapping[str, Any], concepts: Mapping[str, Any],
              precision: Mapping[str, Any] | None = None) -> dict:
    """size: final dataset (real / synthetic); funnel: images after each stage; concept_bank: |B| after L3
    validation; covered: fraction of each reference set's classes a concept covers (paper Fig. 4a);
    top1: kNN and linear-probe top-1 per eval set, pretrained vs the baseline backbone; with
    `precision` (metrics/precision.json), domain_precision: of the pool, the retrieved and the final
    real images."""
    final = dataset.get("final", {})
    out = {
        "size": {"total": final.get("n", 0), "real": final.get("real", 0), "synthetic": final.get("synthetic", 0)},
        "funnel": {s: dataset[s]["n"] for s in FUNNEL if s in dataset},
        "concept_bank": concepts.get("B_after_validation"),
        "covered": {ref: c["covered"] for ref, c in sorted(concepts.get("coverage", {}).items())},
        "top1": {name: {"knn": r["pretrained"]["knn_top1"], "knn_baseline": r["baseline"]["knn_top1"],
                        "linear": r["pretrained"]["linear_top1"], "linear_baseline": r["baseline"]["linear_top1"]}
                 for name, r in sorted(evaluation.get("sets", {}).items())},
    }
    if precision:
        out["domain_precision"] = {s: precision[s]["domain_precision"] for s in PRECISION
                                   if isinstance(precision.get(s), Mapping)}
    return out


def summary_text(s: Mapping[str, Any], dataset_dir: str = "data/dataset",
                 report: str | None = "data/report/index.html") -> str:
    """The few lines printed at the end of a run (the summary stage) and by `pas summary`."""
    size = s["size"]
    lines = [f"pas: {dataset_dir}: {size['total']:,} images ({size['real']:,} real, {size['synthetic']:,} synthetic)"
             + (f" from {s['concept_bank']:,} concepts" if s.get("concept_bank") is not None else "")]
    if s.get("funnel"):
        lines.append("  funnel: " + " → ".join(f"{k} {s['funnel'][k]:,}" for k in FUNNEL if k in s["funnel"]))
    if s.get("domain_precision"):
        dp = s["domain_precision"]
        lines.append("  domain precision: " + ", ".join(f"{k} {dp[k]:.3f}" for k in PRECISION if k in dp))
    for name, t in s.get("top1", {}).items():
        lines.append(f"  {name}: kNN top-1 {t['knn']:.3f} (baseline {t['knn_baseline']:.3f}), "
                     f"linear {t['linear']:.3f} (baseline {t['linear_baseline']:.3f})")
    lines.append(f"  card: {dataset_dir}/README.md" + (f"; report: {report}" if report else "")
                 + "; all figures: dvc metrics show")
    return "\n".join(lines)
