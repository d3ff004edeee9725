"""DVC stage `precision`: the domain precision of the real images after each stage (evaluation only).

Reads the pool's categories (data/pool/index.parquet) and the real keys kept by retrieve, dedup,
leakage and the final dataset; writes metrics/precision.json. No curation stage reads the categories.
"""

from __future__ import annotations

import logging
import sys

from pas.curate.precision import STAGES, PrecisionParams, domain_precision
from pas.io.manifest import read_parquet, write_metrics
from pas.params import build, load, run_stage, stage_parser

log = logging.getLogger("pas.precision")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/precision.json")
    ap.add_argument("--pool-index", default="data/pool/index.parquet")
    ap.add_argument("--retrieved", default="data/retrieved/index.parquet")
    ap.add_argument("--dedup", default="data/dedup/manifest.parquet")
    ap.add_argument("--leakage", default="data/leakage/manifest.parquet")
    ap.add_argument("--dataset", default="data/dataset/index.parquet")
    args = ap.parse_args(argv)
    p = build(PrecisionParams, load(args.params), "precision")
    pool = read_parquet(args.pool_index)
    dedup, leakage = read_parquet(args.dedup), read_parquet(args.leakage)
    final = read_parquet(args.dataset)
    keys = {"retrieve": read_parquet(args.retrieved)["key"],
            "dedup": dedup.loc[dedup["kept"].astype(bool), "key"],
            "leakage": leakage.loc[leakage["kept"].astype(bool), "key"],
            "final": final.loc[final["source"] == "real", "key"]}
    m = domain_precision(keys, pool, p.domain_categories) if p.domain_categories else \
        {"domain_categories": [], "note": "precision.domain_categories is empty: not measured"}
    write_metrics(args.metrics, m)
    log.info("precision (%s): %s", ", ".join(p.domain_categories) or "-", "; ".join(
        f"{s} {m[s]['domain_precision']}" for s in ("pool", *STAGES) if s in m))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
