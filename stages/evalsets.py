"""DVC stage `evalsets`: write each eval set's fixed, seeded train/test split once (shards + index)."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from pas.io.manifest import write_metrics
from pas.params import build, load, run_stage, stage_parser
from pas.train.evalsets import EvalParams, write_evalset

log = logging.getLogger("pas.evalsets")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/evalsets.json")
    ap.add_argument("--out", default="data/evalsets")
    args = ap.parse_args(argv)
    p = build(EvalParams, load(args.params), "eval")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)   # a set removed from params must not linger
    out.mkdir(parents=True)
    t0 = time.time()
    metrics = {spec.name: write_evalset(spec, out, split_seed=p.split_seed, max_pixels=p.max_pixels,
                                        max_side=p.max_side) for spec in p.specs}
    write_metrics(args.metrics, metrics)
    log.info("evalsets: %s in %.1fs", ", ".join(f"{k} {v['n_classes']} classes {v['n_train']}/{v['n_test']} "
                                                 f"train/test" for k, v in metrics.items()) or "none", time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
