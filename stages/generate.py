"""DVC stage `generate`: L4 scene captions per accepted concept, n_synth diffusion images per caption
(paper §3.2) → data/generated/. Resumable: progress lives in --cache (not a DVC out), see
pas.collect.generate."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from pas.collect import load_concepts
from pas.collect.captions import load_template, write_captions
from pas.collect.generate import (DiffusionParams, GenerateParams, caption_fingerprint, cached_captions,
                                  generate)
from pas.engine import EngineConfig
from pas.io.manifest import write_metrics
from pas.llm import LLMError
from pas.params import ParamsError, build, load, run_stage

log = logging.getLogger("pas.stages.generate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concepts", default="data/concepts/bank.parquet", help="concept bank parquet")
    ap.add_argument("--model", default="models/diffusion", help="diffusers pipeline folder (models stage)")
    ap.add_argument("--out", default="data/generated", help="output folder (DVC out)")
    ap.add_argument("--cache", default="data/.cache/generate",
                    help="scratch folder holding finished shards and captions across (killed) runs")
    ap.add_argument("--metrics", default="metrics/generate.json")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--fresh", action="store_true", help="forget the scratch folder and start over")
    ap.add_argument("--prune-cache", action="store_true",
                    help="after a complete run, delete the scratch image shards (captions are kept)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    try:
        params = load(args.params)
        p = build(GenerateParams, params, section="generate")
        d = build(DiffusionParams, params, section="diffusion")
        llm_spec = (params.get("llm") or {}).get("l4")
        if not llm_spec:
            raise ParamsError("llm.l4: missing (the L4 caption model spec)")
        from pas.llm import make_backend, spec_from_dict
        spec = spec_from_dict(llm_spec, "llm.l4")
        concepts = load_concepts(args.concepts)
        template = load_template(p.prompt_file)
    except (ParamsError, FileNotFoundError, ValueError) as e:
        log.error("generate: %s", e)
        return 2
    if args.fresh and Path(args.cache).exists():
        shutil.rmtree(args.cache)

    llm_fp = None
    if Path(spec.model).exists():
        from pas.models.files import fingerprint_dir
        llm_fp = fingerprint_dir(spec.model)

    def make():
        with make_backend(spec, "llm.l4") as llm:
            return write_captions(llm, concepts, p.n_cap, p.seed, template, p.max_attempts,
                                  p.max_new_tokens, p.require_concept, p.min_words, p.max_words)

    t0 = time.perf_counter()
    fp = caption_fingerprint(concepts, p, template, llm_spec, llm_fp)
    try:
        captions, cached = cached_captions(args.cache, fp, make)
    except LLMError as e:  # unreachable, bad key, 5xx past the retries
        log.error("generate failed: L4 captions: %s", " ".join(str(e).split()))
        return 1
    if captions.fallback_fraction > p.max_fallback_fraction:
        log.error("generate failed: %d of %d captions (%.0f%%) are template fallbacks, above "
                  "generate.max_fallback_fraction = %g (%d L4 requests failed)", captions.n_fallback,
                  captions.n_captions, 100 * captions.fallback_fraction, p.max_fallback_fraction,
                  captions.n_failed_requests)
        return 1
    t_cap = time.perf_counter() - t0
    try:
        metrics = generate(captions, args.model, args.out, args.cache, p, d, engine=EngineConfig.from_env())
    except FileNotFoundError as e:
        log.error("generate: %s", e)
        return 2
    metrics.update(captions_cached=cached, seconds_captions=t_cap, seconds=time.perf_counter() - t0)
    if args.prune_cache:
        shutil.rmtree(Path(args.cache) / "shards", ignore_errors=True)
    # a resumed run draws fewer shards than an uninterrupted one: run log, not a tracked result
    write_metrics(args.metrics, metrics, run_keys=("n_shards_generated", "images_generated"))
    log.info("generate: %d concepts → %d captions (%d fallback%s) → %d images in %d shards "
             "(%d resumed), captions %.1f s, %.3f s/img, total %.1f s", metrics["n_concepts"],
             metrics["n_captions"], metrics["n_fallback_captions"], ", cached" if cached else "",
             metrics["n_images"], metrics["n_shards"], metrics["n_shards_resumed"], t_cap,
             metrics["seconds_per_image"], metrics["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
