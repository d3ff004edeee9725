"""DVC stage `report`: the run report, one offline HTML page of the run's outputs (pas.report).

Reads the outputs of concepts … evaluate under --root (the deps listed in dvc.yaml, the layout of
pas.report.Inputs); writes data/report/index.html and the PNG figures it links (funnel, concept
discovery, Pareto peel). Open data/report/index.html in any browser, offline.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from pas.params import ParamsError, load, run_stage, stage_parser
from pas.report import build_report

log = logging.getLogger("pas.report")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--root", default=".", help="the run's repository root (data/ and metrics/ below it)")
    ap.add_argument("--out", default="data/report", help="report folder (index.html + figures)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        res = build_report(Path(args.root), Path(args.out), params=load(args.params))
    except ParamsError:
        raise                                   # run_stage: one line, exit 2
    except (ValueError, OSError) as e:          # an unreadable input (ShardError is a ValueError)
        log.error("report failed: %s", e)
        return 2
    log.info("report: %s (%d thumbnails, %d figures%s), %.1f s", res.index, res.n_images, len(res.figures),
             "; missing: " + ", ".join(f"{k} ({v})" for k, v in res.missing.items()) if res.missing else "",
             time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
