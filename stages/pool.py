"""DVC stage `pool`: index a folder of images (or webdataset shards) into the pool `retrieve` searches."""

from __future__ import annotations

import argparse
import logging
import sys

from pas.data.pool import PoolParams, build_pool
from pas.io.manifest import write_metrics
from pas.params import build, load, run_stage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clip", default="models/clip", help="CLIP folder from the models stage")
    ap.add_argument("--out", default="data/pool")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/pool.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = build(PoolParams, load(args.params), "pool")

    from pas.engine import EngineConfig

    # PAS_ENGINE=ray: CLIP is loaded by the Ray actors that embed the shards, not here
    write_metrics(args.metrics, build_pool(p, None, args.out, clip_dir=args.clip, engine=EngineConfig.from_env()))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
