"""DVC stage `evaluate`: kNN and linear-probe top-1 of the pretrained backbone and a baseline per eval set."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from pas.io.manifest import write_metrics
from pas.params import build, load, run_stage, stage_parser
from pas.train.evaluate import EvalParams, evaluate

log = logging.getLogger("pas.evaluate")


def _write_plot(metrics: dict, path: Path) -> None:
    """One row per (eval set, protocol, backbone): the accuracy bar chart of `dvc plots`."""
    rows = ["run,top1"]
    for name, res in sorted(metrics["sets"].items()):
        for proto in ("knn_top1", "linear_top1"):
            for model in ("pretrained", "baseline"):
                rows.append(f"{name} {proto.split('_')[0]} {model},{res[model][proto]:.6g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/eval.json")
    ap.add_argument("--backbone", default="models/backbone")
    ap.add_argument("--init", default="models/backbone_init", help="baseline architecture + random init")
    ap.add_argument("--evalsets", default="data/evalsets")
    ap.add_argument("--plot", default="data/evaluate/accuracy.csv", help="accuracy rows for `dvc plots`")
    args = ap.parse_args(argv)
    p = build(EvalParams, load(args.params), "eval")
    t0 = time.time()
    metrics = evaluate(p, args.backbone, args.init, args.evalsets)
    write_metrics(args.metrics, metrics)
    _write_plot(metrics, Path(args.plot))
    log.info("evaluate: %s in %.1fs", "; ".join(
        f"{k}: kNN {v['pretrained']['knn_top1']:.3f} (baseline {v['baseline']['knn_top1']:.3f}), linear "
        f"{v['pretrained']['linear_top1']:.3f} (baseline {v['baseline']['linear_top1']:.3f})"
        for k, v in metrics["sets"].items()) or "no eval sets", time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
