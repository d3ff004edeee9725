"""DVC stage `generate`: n_synth diffusion images per L4 caption of data/captions/ (paper §3.2) →
data/generated/. Resumable: progress lives in --cache (not a DVC out), see pas.collect.generate."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from pas.collect.caption_files import read_captions
from pas.collect.generate import DiffusionParams, GenerateParams, generate
from pas.engine import EngineConfig
from pas.io.manifest import write_metrics
from pas.params import build, load, run_stage, stage_parser

log = logging.getLogger("pas.stages.generate")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/generate.json")
    ap.add_argument("--captions", default="data/captions", help="the captions stage's out")
    ap.add_argument("--model", default="models/diffusion", help="diffusers pipeline folder (models stage)")
    ap.add_argument("--out", default="data/generated", help="output folder (DVC out)")
    ap.add_argument("--cache", default="data/.cache/generate",
                    help="scratch folder holding finished shards across (killed) runs")
    ap.add_argument("--fresh", action="store_true", help="forget the scratch folder and start over")
    ap.add_argument("--prune-cache", action="store_true",
                    help="after a complete run, delete the scratch image shards")
    args = ap.parse_args(argv)

    params = load(args.params)
    p = build(GenerateParams, params, section="generate")
    d = build(DiffusionParams, params, section="diffusion")
    try:
        captions = read_captions(args.captions)
    except (FileNotFoundError, ValueError) as e:
        log.error("generate: %s", e)
        return 2
    if args.fresh and Path(args.cache).exists():
        shutil.rmtree(args.cache)

    t0 = time.perf_counter()
    try:
        metrics = generate(captions, args.model, args.out, args.cache, p, d, engine=EngineConfig.from_env())
    except FileNotFoundError as e:
        log.error("generate: %s", e)
        return 2
    metrics.update(seconds=time.perf_counter() - t0)
    if args.prune_cache:
        shutil.rmtree(Path(args.cache) / "shards", ignore_errors=True)
    # a resumed run draws fewer shards than an uninterrupted one: run log, not a tracked result
    write_metrics(args.metrics, metrics, run_keys=("n_shards_generated", "images_generated"))
    log.info("generate: %d concepts, %d captions (%d fallback) → %d images in %d shards (%d resumed), "
             "%.3f s/img, total %.1f s", metrics["n_concepts"], metrics["n_captions"],
             metrics["n_fallback_captions"], metrics["n_images"], metrics["n_shards"],
             metrics["n_shards_resumed"], metrics["seconds_per_image"], metrics["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
