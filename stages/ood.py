"""DVC stage `ood`: three CLIPN-style OOD scores per kept image (paper §3.3).

Reads the leakage keep-manifest, the retrieved + generated shards, the accepted concepts of the bank,
and the CLIPN folder (`models/clipn`): when `models.clipn` is configured, CLIPN's base CLIP embeds the
images and its checkpoint gives the no-tower (mode clipn); otherwise the CLIP folder (`models/clip`)
with its trained no head (no_head) or negative prompts (negative_prompts). Writes `<out>/scores.parquet`
(key, source, ood_b, ood_bprime, ood_blur_delta, text_boxes) and `metrics/ood.json`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from pas.concepts import load_bank
from pas.curate.ood import (OodParams, OodScorer, Timings, derive_generalized_concepts,
                            ood_models, run_fingerprint, score_shards)
from pas.engine import EngineConfig
from pas.io.manifest import read_parquet, source_order, write_metrics, write_parquet
from pas.params import build, load, run_stage, stage_parser

log = logging.getLogger("pas.stages.ood")


def _kept_keys(path: str) -> set[str]:
    df = read_parquet(path)
    for col in ("key", "kept"):
        if col not in df.columns:
            raise ValueError(f"{path}: manifest has no '{col}' column (columns: {list(df.columns)})")
    return set(df.loc[df["kept"].astype(bool), "key"].astype(str))


def _generalized(p: OodParams, params: dict) -> tuple[list[str], str]:
    if p.generalized_concepts:
        return list(p.generalized_concepts), "params"
    from pas.concepts.params import DomainParams

    d = build(DomainParams, params, "domain")
    return derive_generalized_concepts(d.name, d.description), "domain"


def _summary(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"mean": None}
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(np.mean(x)), "q05": q[0], "q25": q[1], "q50": q[2], "q75": q[3], "q95": q[4]}


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/ood.json")
    ap.add_argument("--manifest", default="data/leakage/manifest.parquet", help="leakage keep-manifest")
    ap.add_argument("--images", nargs="+", default=["data/retrieved", "data/generated"],
                    help="webdataset shard folders")
    ap.add_argument("--concepts", default="data/concepts/bank.parquet")
    ap.add_argument("--clip", default="models/clip", help="CLIP folder from the models stage")
    ap.add_argument("--clipn", default=None, help="CLIPN folder from the models stage (models/clipn); "
                    "used when models.clipn is configured, else --clip")
    ap.add_argument("--out", default="data/ood")
    ap.add_argument("--cache", default="data/.cache/ood",
                    help="scratch folder keeping each scored shard across (killed) runs (not a DVC out)")
    args = ap.parse_args(argv)
    params = load(args.params)
    p = build(OodParams, params, "ood")
    generalized, b_prime_from = _generalized(p, params)
    kept = _kept_keys(args.manifest)
    if not kept:                        # leakage dropped everything: nothing to score is not a result
        log.error("ood failed: %s keeps no image (dedup/leakage removed them all)", args.manifest)
        return 2
    concepts = load_bank(args.concepts)
    if not concepts:
        raise ValueError(f"{args.concepts}: no accepted concepts")

    from pas.models.det_trunk import default_det_model
    from pas.hashing import sha256_file
    from pas.models.files import fingerprint_dir

    models = ood_models(args.clip, args.clipn)
    engine = EngineConfig.from_env()
    clipn_sha = sha256_file(models.clipn_checkpoint) if models.clipn_checkpoint else ""
    # the scorer loads CLIP + the detector and encodes B and B' once with that CLIP where the engine
    # runs it (this process, or each Ray actor: then this process loads no model, it may have no GPU);
    # the first scored shard brings back the encoding's metrics
    scorer = OodScorer(models.clip_dir, p, (concepts, generalized), clipn_checkpoint=models.clipn_checkpoint)
    prompt_info: dict = {}
    timings = Timings()
    fp = run_fingerprint(p, {"clip": fingerprint_dir(models.clip_dir), "clipn": clipn_sha,
                             "detector": sha256_file(default_det_model())}, concepts, generalized)
    t_score = time.perf_counter()
    df, n_resumed = score_shards(args.images, kept, scorer, args.cache, fp, batch_size=p.batch_size,
                                 engine=engine, timings=timings, prompt_info=prompt_info)
    t_score = time.perf_counter() - t_score
    write_parquet(df, Path(args.out) / "scores.parquet")
    n = timings.n_images
    metrics = {
        # ood drops nothing (prune's Pareto fronts do): every image in is scored and kept
        "n_in": len(kept), "n_kept": len(df), "dropped": {}, "mode": prompt_info["mode"],
        "clipn_base_match": prompt_info["clipn_base_match"],
        "logit_scale": prompt_info["logit_scale"], "n_concepts": len(concepts), "n_generalized": len(generalized),
        "generalized_concepts": generalized, "generalized_from": b_prime_from,
        "n_with_text": int((df["text_boxes"] > 0).sum()),
        "n_text_boxes": int(df["text_boxes"].sum()),
        "n_shards_resumed": n_resumed,
        "ood_b": _summary(df["ood_b"].to_numpy()),
        "ood_bprime": _summary(df["ood_bprime"].to_numpy()),
        "ood_blur_delta": _summary(df["ood_blur_delta"].to_numpy()),
        "by_source": {s: {"n_in": int(len(g)), "n_kept": int(len(g)),
                          "ood_b_mean": float(g["ood_b"].mean()) if len(g) else None}
                      for s, g in ((s, df[df["source"] == s]) for s in source_order(df["source"]))},
        # timings of the images scored in this run (resumed shards excluded)
        "n_timed": n,
        "seconds_per_image": {
            "clip": timings.clip_s / n if n else None,           # I and, for images with text, I'
            "text_detection": timings.detect_s / n if n else None,
            "blur": timings.blur_s / n if n else None,
            "score": timings.score_s / n if n else None,
            "total": t_score / n if n else None,           # everything, shard I/O and decoding included
        },
        "seconds_text_embeddings": prompt_info["seconds"],
    }
    write_metrics(args.metrics, metrics)
    log.info("ood: scored %d of %d kept images (%d resumed shards, engine %s), mode %s, |B|=%d, |B'|=%d, "
             "%d with text; mean OOD_B %.3f, OOD_B' %.3f, blur delta %.4f",
             len(df), len(kept), n_resumed, engine.engine, prompt_info["mode"], len(concepts), len(generalized),
             metrics["n_with_text"], metrics["ood_b"].get("mean") or 0.0,
             metrics["ood_bprime"].get("mean") or 0.0, metrics["ood_blur_delta"].get("mean") or 0.0)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(run_stage(main))
    except (ValueError, FileNotFoundError) as e:   # bad input: a message, not a traceback (params: run_stage)
        logging.getLogger("pas.stages.ood").error("%s", e)
        sys.exit(2)
