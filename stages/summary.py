"""DVC stage `summary`: the headline figures of the run (pas.summary) → metrics/summary.json."""

from __future__ import annotations

import logging
import sys

from pas.io.manifest import read_metrics, write_metrics
from pas.params import run_stage, stage_parser
from pas.summary import summarize, summary_text

log = logging.getLogger("pas.summary")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, params=False)
    ap.add_argument("--dataset", default="metrics/dataset.json", help="funnel and final size (prune stage)")
    ap.add_argument("--eval", default="metrics/eval.json", help="top-1 per eval set (evaluate stage)")
    ap.add_argument("--concepts", default="metrics/concepts.json", help="|B| and coverage (concepts stage)")
    ap.add_argument("--precision", default=None, help="domain precision per stage (precision stage), if any")
    ap.add_argument("--dataset-dir", default="data/dataset", help="named in the printed summary")
    ap.add_argument("--out", default="metrics/summary.json")
    args = ap.parse_args(argv)
    try:
        s = summarize(read_metrics(args.dataset), read_metrics(args.eval), read_metrics(args.concepts),
                      read_metrics(args.precision) if args.precision else None)
    except FileNotFoundError as e:
        log.error("summary failed: %s (run the stage that writes it)", e)
        return 2
    write_metrics(args.out, s)
    print(summary_text(s, args.dataset_dir), flush=True)   # the run's last words
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
