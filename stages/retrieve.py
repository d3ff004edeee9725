"""DVC stage `retrieve`: top-k_retrieve real images per accepted concept (paper §3.2) → data/retrieved/.

Backend clip_service keeps its progress (kNN answers per batch, img2dataset shards) in --cache, not a
DVC out: a killed run resumes there (pas.collect.knn_service)."""

from __future__ import annotations

import logging
import sys

from pas.concepts import load_bank
from pas.collect.clip_client import ServiceError
from pas.collect.knn_service import DownloadError
from pas.collect.retrieve import PoolError, RetrieveParams, retrieve
from pas.io.manifest import write_metrics
from pas.params import ParamsError, build, load, run_stage, stage_parser

log = logging.getLogger("pas.stages.retrieve")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/retrieve.json")
    ap.add_argument("--concepts", default="data/concepts/bank.parquet", help="concept bank parquet")
    ap.add_argument("--pool", default="data/pool", help="pool folder (shards, faiss.index, pool.json)")
    ap.add_argument("--clip", default="models/clip", help="CLIP model folder (same model as the pool)")
    ap.add_argument("--out", default="data/retrieved", help="output folder")
    ap.add_argument("--cache", default="data/.cache/retrieve",
                    help="clip_service: scratch folder holding finished query batches and download shards")
    ap.add_argument("--device", default="cpu", help="torch device for the CLIP text encoder")
    args = ap.parse_args(argv)

    try:
        params = build(RetrieveParams, load(args.params), section="retrieve")
        concepts = load_bank(args.concepts)
        encoder = None
        if params.backend == "pool" or params.service_params().query == "embedding":
            from pas.models.clip import load_clip
            encoder = load_clip(args.clip, device=args.device)
        metrics = retrieve(concepts, args.out, params, encoder=encoder, pool_dir=args.pool,
                           cache_dir=args.cache)
    except (ParamsError, PoolError, ServiceError, FileNotFoundError) as e:
        log.error("retrieve failed: %s", e)
        return 2
    except DownloadError as e:
        log.error("retrieve failed: %s", e)
        return 1
    write_metrics(args.metrics, metrics)
    log.info("retrieve: %d concepts → %d images (%d unique), hits/concept min %d median %g max %d, "
             "%d concepts without hits, %.1f s (%.0f img/s)", metrics["n_concepts"], metrics["n_images"],
             metrics["n_unique"], metrics["hits_per_concept_min"], metrics["hits_per_concept_median"],
             metrics["hits_per_concept_max"], metrics["concepts_zero_hits"], metrics["seconds"],
             metrics["n_unique"] / max(metrics["seconds"], 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
