"""DVC stage `summary`: the headline figures of the run (pas.summary) → metrics/summary.json."""

from __future__ import annotations

import argparse
import logging
import sys

from pas.io.manifest import read_metrics, write_metrics
from pas.params import run_stage
from pas.summary import summarize

log = logging.getLogger("pas.summary")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="metrics/dataset.json", help="funnel and final size (prune stage)")
    ap.add_argument("--eval", default="metrics/eval.json", help="top-1 per eval set (evaluate stage)")
    ap.add_argument("--concepts", default="metrics/concepts.json", help="|B| and coverage (concepts stage)")
    ap.add_argument("--out", default="metrics/summary.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = summarize(read_metrics(args.dataset), read_metrics(args.eval), read_metrics(args.concepts))
    except FileNotFoundError as e:
        log.error("summary failed: %s (run the stage that writes it)", e)
        return 2
    write_metrics(args.out, s)
    log.info("summary: %d images (%d real, %d synthetic); %s", s["size"]["total"], s["size"]["real"],
             s["size"]["synthetic"], "; ".join(
                 f"{k}: kNN {v['knn']:.3f} (baseline {v['knn_baseline']:.3f}), linear {v['linear']:.3f} "
                 f"(baseline {v['linear_baseline']:.3f})" for k, v in s["top1"].items()) or "no eval sets")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
