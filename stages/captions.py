"""DVC stage `captions`: L4 writes n_cap scene captions per accepted concept (paper §3.2) →
data/captions/ (captions.parquet, transcripts.jsonl), which `generate` draws images from.

Runs in the llm container (vLLM), like `concepts`. Resumable: L4's answers are saved piece by piece
in --cache (not a DVC out; failed requests never), so a killed run asks only what it has no answer
for. Fails (exit 1, nothing written to --out) when L4 cannot serve, or when template fallbacks exceed
captions.max_fallback_fraction of all captions."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from pas.concepts import load_bank
from pas.collect.caption_files import write_caption_files
from pas.collect.captions import CaptionsParams, load_template, write_captions
from pas.io.manifest import write_metrics
from pas.llm import LLMError, LLMSection, make_backend
from pas.llm.cache import AnswerCache, answer_fingerprint
from pas.params import ParamsError, build, load, run_stage, stage_parser

log = logging.getLogger("pas.stages.captions")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/captions.json")
    ap.add_argument("--concepts", default="data/concepts/bank.parquet", help="concept bank parquet")
    ap.add_argument("--out", default="data/captions", help="output folder (DVC out)")
    ap.add_argument("--cache", default="data/.cache/captions",
                    help="scratch folder keeping L4's answers across (killed) runs")
    ap.add_argument("--fresh", action="store_true", help="forget the saved answers and ask L4 again")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    params = load(args.params)
    p = build(CaptionsParams, params, section="captions")
    if not (params.get("llm") or {}).get("l4"):
        raise ParamsError("llm.l4: missing (the L4 caption model spec)")
    spec = build(LLMSection, params, section="llm").spec("l4")
    template = load_template(p.prompt_file)
    try:
        concepts = load_bank(args.concepts)
    except (FileNotFoundError, ValueError) as e:
        log.error("captions: %s", e)
        return 2
    if args.fresh and Path(args.cache).exists():
        shutil.rmtree(args.cache)

    model_fp = None
    if Path(spec.model).exists():
        from pas.models.files import fingerprint_dir
        model_fp = fingerprint_dir(spec.model)
    answers = AnswerCache(Path(args.cache) / "answers", answer_fingerprint(spec, model_fp))
    t0 = time.perf_counter()
    try:
        with make_backend(spec, "llm.l4") as llm:
            caps = write_captions(llm, concepts, p.n_cap, p.seed, template, p.max_attempts, p.max_new_tokens,
                                  p.require_concept, p.min_words, p.max_words, progress=not args.no_progress,
                                  answers=answers)
    except LLMError as e:  # unreachable, bad key, 5xx past the retries: the answers so far are kept
        log.error("captions failed: L4: %s", " ".join(str(e).split()))
        return 1
    if caps.fallback_fraction > p.max_fallback_fraction:
        log.error("captions failed: %d of %d captions (%.0f%%) are template fallbacks, above "
                  "captions.max_fallback_fraction = %g (%d L4 requests failed)", caps.n_fallback,
                  caps.n_captions, 100 * caps.fallback_fraction, p.max_fallback_fraction, caps.n_failed_requests)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_caption_files(caps, out / "captions.parquet", out / "transcripts.jsonl")
    answers.compact()
    metrics = {**caps.metrics(), "n_requests_cached": answers.hits,
               "n_requests_asked": caps.n_requests - answers.hits, "seconds": time.perf_counter() - t0}
    # how many answers came from the saved ones depends on where a killed run stopped: run log
    write_metrics(args.metrics, metrics, run_keys=("n_requests_asked",))
    log.info("captions: %d concepts → %d captions (%d fallback), %d L4 requests (%d saved before, %d failed), "
             "%.1f s", metrics["n_concepts"], caps.n_captions, caps.n_fallback, caps.n_requests, answers.hits,
             caps.n_failed_requests, metrics["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
