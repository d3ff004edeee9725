"""DVC stage `pool`: index a folder of images (or webdataset shards) into the pool `retrieve` searches.

`--check` only lists the entries of pool.source the pool would skip for what they are (FIFOs,
dangling links, link loops, links out of the folder, non-UTF-8 names) and exits 1 if any of them
would stop DVC hashing the folder; run it before `dvc repro` on a new pool.

Each finished chunk of CHUNK input files (decoded JPEGs + CLIP embeddings) is kept in `--cache`
(data/.cache/pool, git-ignored, not a DVC out), keyed by the files' bytes: a run killed half-way
redoes only the chunks it had not finished and writes the bytes of an uninterrupted run. `--fresh`
forgets them. PAS_POOL_WORKERS (decode processes, 0 = every core) is a machine setting read from the
environment, like PAS_ENGINE: same bytes for any value, so it reruns nothing.

With `retrieve.backend: clip_service` nothing searches the pool: the stage writes an empty one without
reading pool.source or loading CLIP (pas.data.pool.unused_pool)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from pas.data.pool import DVC_BLOCKERS, PoolParams, build_pool, check_source, unused_pool, workers_from_env
from pas.io.manifest import write_metrics
from pas.params import build, load, run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/pool.json")
    ap.add_argument("--clip", default="models/clip", help="CLIP folder from the models stage")
    ap.add_argument("--out", default="data/pool")
    ap.add_argument("--check", action="store_true", help="list odd entries of pool.source; build nothing")
    ap.add_argument("--cache", default="data/.cache/pool",
                    help="scratch folder keeping finished chunks across killed runs (not a DVC out); '' disables it")
    ap.add_argument("--fresh", action="store_true", help="forget the finished chunks and start over")
    args = ap.parse_args(argv)
    params = load(args.params)          # validated: retrieve.backend is pool or clip_service
    p = dataclasses.replace(build(PoolParams, params, "pool"), workers=workers_from_env())
    if args.check:
        return check(p)
    backend = (params.get("retrieve") or {}).get("backend", "pool")
    if backend != "pool":
        write_metrics(args.metrics, unused_pool(args.out, f"retrieve.backend is {backend}"))
        return 0

    from pas.engine import EngineConfig

    if args.fresh and args.cache and Path(args.cache).exists():
        shutil.rmtree(args.cache)
    # PAS_ENGINE=ray: CLIP is loaded by the Ray actors that embed the chunks, not here
    metrics = build_pool(p, None, args.out, clip_dir=args.clip, engine=EngineConfig.from_env(),
                         cache_dir=args.cache or None)
    # a resumed run computes fewer chunks than an uninterrupted one: run log, not a tracked result
    write_metrics(args.metrics, metrics, run_keys=("n_chunks_computed",))
    return 0


def check(p: PoolParams) -> int:
    bad = check_source(p)
    for b in bad:
        print(f"{b['reason']}\t{b['path']}\t{b['detail']}".rstrip())
    blockers = [b for b in bad if b["reason"] in DVC_BLOCKERS]
    print(f"pool.source={p.source!r}: {len(bad)} entries skipped for what they are, "
          f"{len(blockers)} of them stop DVC hashing it ({', '.join(DVC_BLOCKERS)})")
    return 1 if blockers else 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
