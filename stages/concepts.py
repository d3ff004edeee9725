"""`concepts` stage (paper §3.1): domain name + description → concept bank B.

    python stages/concepts.py --params params.yaml --text-embed models/text_embed \
        --out data/concepts --metrics metrics/concepts.json

The LLMs are the `llm.l1` (generation), `llm.l2` (expansion), `llm.l3` (validation, when
concepts.validator = llm) specs of params.yaml; their `model` folders come from the `models` stage.
An LLM that fails (unreachable, bad key, no usable answer) or a bank with no accepted concept ends
the stage with exit status 1 and one line saying why; nothing is written to --out then.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd

from pas.concepts.coverage import coverage, histogram, load_reference
from pas.concepts.discovery import DiscoveryError, Prompts, discover, load_prompt, validate_bank
from pas.concepts.lexical import text_encoder
from pas.concepts.params import ConceptsParams, DomainParams
from pas.io.manifest import write_metrics, write_parquet
from pas.jsonio import write_json
from pas.llm import LLMError, LLMSection, make_backend
from pas.params import build, load, run_stage, stage_parser

log = logging.getLogger("pas.stages.concepts")


def main(argv=None) -> dict:
    ap = stage_parser(__doc__, "metrics/concepts.json")
    ap.add_argument("--text-embed", default="models/text_embed", help="sentence-transformers folder")
    ap.add_argument("--clip", default="models/clip", help="CLIP folder (coverage_embedder: clip)")
    ap.add_argument("--out", default="data/concepts")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (LLMError, DiscoveryError) as e:  # one line, no traceback: the message says what failed
        log.error("concepts failed: %s", " ".join(str(e).split()))
        raise SystemExit(1) from None


def run(args) -> dict:
    t0 = time.perf_counter()
    params = load(args.params)
    p = build(ConceptsParams, params, section="concepts")
    domain = build(DomainParams, params, section="domain")
    llm = build(LLMSection, params, section="llm")
    roles = ["l1", "l2"] + (["l3"] if p.validator == "llm" else [])
    # one backend per role, each with its own sampling settings; roles whose model is loaded the same
    # way (vLLM: same engine arguments) share the loaded model (pas.llm.base.EngineSlot)
    backends = {role: make_backend(llm.spec(role), f"llm.{role}") for role in roles}
    out = Path(args.out)

    found = discover(backends["l1"], backends["l2"], domain, p, Prompts.default(), progress=not args.no_progress)
    t_discover = time.perf_counter() - t0

    for role in ("l1", "l2"):  # free L1/L2 (a vLLM engine's GPU memory) unless L3 runs on the same model
        if p.validator != "llm" or backends[role].identity() != backends["l3"].identity():
            backends[role].close()
    gc.collect()

    embedder = None
    if p.validator == "embedding" or (p.references and p.coverage_embedder == "text_embed"):
        from pas.models.text_embed import load_text_embed
        embedder = load_text_embed(args.text_embed)
    from pas.concepts.validate import EmbeddingValidator, LLMValidator
    if p.validator == "llm":
        validator = LLMValidator(backends["l3"], domain, load_prompt("concepts_validate"), seed=p.seed)
    else:
        validator = EmbeddingValidator(embedder, domain, load_prompt("concepts_embedding_anchor"))
    scores, accepted = validate_bank(found, validator, p.validator_threshold)
    for b in backends.values():
        b.close()

    concepts = list(found.bank)
    verdicts = validator.counts() if p.validator == "llm" else {}
    if not any(accepted):  # downstream stages would run on nothing
        raise DiscoveryError(f"no concept of {len(concepts)} passed {p.validator} validation "
                             f"(threshold {p.validator_threshold}"
                             + (f"; verdicts {dict(sorted(verdicts.items()))}" if verdicts else "")
                             + "): refusing to write an empty bank")
    out.mkdir(parents=True, exist_ok=True)
    bank = pd.DataFrame({
        "concept": concepts,
        "first_iteration": [found.bank[c]["first_iteration"] for c in concepts],
        "origin": [found.bank[c]["origin"] for c in concepts],
        "generation_sample": pd.array([found.bank[c]["sample"] for c in concepts], dtype="Int64"),
        "score": pd.array(scores, dtype="float64"),
        "accepted": pd.array(accepted, dtype="bool"),
    })
    write_parquet(bank, out / "bank.parquet", sort_by="concept")
    history = {
        "generation": [{"n": n + 1, "size": s, "new": k}
                       for n, (s, k) in enumerate(zip(found.generation_sizes, found.generation_new))],
        "expansion": [{"round": i, "size": s, "new": (found.expansion_new[i - 1] if i else None)}
                      for i, s in enumerate(found.expansion_sizes)],
        "generation_stop": found.generation_stop,
        "expansion_stop": found.expansion_stop,
    }
    write_json(out / "history.json", history)
    with open(out / "transcripts.jsonl", "w", encoding="utf-8") as f:
        for rec in found.transcripts:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")

    kept = [c for c, ok in zip(concepts, accepted) if ok]
    cov_metrics, rows, hist = {}, [], {}
    if p.references:
        embed = text_encoder(p.coverage_embedder, text_embed=embedder, clip_dir=args.clip)
        concept_emb = embed(kept)
        for ref in p.references:
            names = load_reference(ref)
            cov = coverage(embed(names), concept_emb, p.coverage_threshold)
            cov_metrics[ref] = {"classes": len(names), "covered": cov.covered,
                                "mean_max_similarity": cov.mean_max_similarity}
            rows += [{"reference": ref, "class_name": y, "nearest_concept": kept[j] if j >= 0 else None,
                      "similarity": float(s)} for y, j, s in zip(names, cov.nearest.tolist(), cov.similarity)]
            centres, hist[ref] = histogram(cov.similarity, p.coverage_bins)
        hist_df = pd.DataFrame({"similarity": centres.round(4), **hist})
    else:
        hist_df = pd.DataFrame({"similarity": []})
    pd.DataFrame(rows, columns=["reference", "class_name", "nearest_concept", "similarity"]).to_csv(
        out / "coverage.csv", index=False, float_format="%.6f")
    hist_df.to_csv(out / "coverage_hist.csv", index=False)

    seconds = time.perf_counter() - t0
    metrics = {
        "B0": found.B0_size,
        "B_before_validation": len(concepts),
        "B_after_validation": len(kept),
        "generation_samples": len(found.generation_sizes),
        "generation_drawn": found.generation_drawn,
        "expansion_rounds": len(found.expansion_new),
        # L1 samples in L2's history per expansion round, and those cut to fit L2's context
        "history_samples_kept": found.history_kept,
        "history_samples_dropped": found.history_dropped,
        "history_context_tokens": found.history_context,
        "generation_stop": found.generation_stop,
        "expansion_stop": found.expansion_stop,
        "stopped_by_cap": found.cap_stops,   # loops a concepts.max_* cap ended instead of λ1/λ2
        "validator": p.validator,
        "rejected": len(concepts) - len(kept),
        "verdicts": dict(sorted(verdicts.items())),   # L3: logprobs, text (answers); unclear, unusable, error
        "n_unclear": verdicts.get("unclear", 0),      # "Maybe, it depends": not a validation, rejected
        "n_unusable": verdicts.get("unusable", 0) + verdicts.get("error", 0),
        "answers": dict(sorted(found.answers.items())),
        "coverage": cov_metrics,
        "seconds_discovery": t_discover,
        "seconds_total": seconds,
    }
    write_metrics(args.metrics, metrics)
    log.info("concepts: |B0|=%d |B|=%d→%d after %s validation; N=%d (%s), %d expansion rounds (%s); "
             "coverage %s; %.1fs", found.B0_size, len(concepts), len(kept), p.validator,
             len(found.generation_sizes), found.generation_stop, len(found.expansion_new), found.expansion_stop,
             {r: round(v["covered"], 3) for r, v in cov_metrics.items()}, seconds)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(main))
