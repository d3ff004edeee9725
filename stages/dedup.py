"""DVC stage `dedup`: SSCD copy detection over retrieved + generated images (paper §3.3, App. D.1.4).

Reads the retrieved and generated shard folders and the SSCD model folder; writes to `--out`:
  manifest.parquet   key, source, kept, reason, score, component, component_size, representative
  descriptors.npy    float32 (N, D) SSCD descriptors, rows in the order of keys.parquet
  keys.parquet       row, key, source (the descriptor order; `leakage` reuses the descriptors)
  descriptors.json   model sha256, resize, dims, n (consumers check they use the same model)
  groups.html        the largest duplicate groups as thumbnails (paper Fig. 9/12), opens offline
and `metrics/dedup.json` (n_in, n_kept, dropped by reason, by_source: pas.io.manifest.selection_stats;
components_gt1, largest_component).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pas.curate.dedup import DedupParams, collapse_warning, dedup, summary
from pas.engine import EngineConfig
from pas.io.manifest import write_metrics, write_parquet
from pas.jsonio import write_json
from pas.params import build, load, run_stage, stage_parser

log = logging.getLogger("pas.stages.dedup")
CHUNK = 512          # images decoded at a time (descriptors run in batch_size batches inside)


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__, "metrics/dedup.json")
    ap.add_argument("--images", nargs="+", default=["data/retrieved", "data/generated"],
                    help="webdataset shard folders (retrieved, generated)")
    ap.add_argument("--sscd", default="models/sscd", help="SSCD folder from the models stage")
    ap.add_argument("--out", default="data/dedup")
    ap.add_argument("--cache", default="data/.cache/dedup",
                    help="scratch folder keeping finished descriptor chunks across killed runs (not a DVC out); "
                         "'' disables it")
    args = ap.parse_args(argv)
    p = build(DedupParams, load(args.params), "dedup")

    from pas.curate.descriptors import descriptor_cache, folder_descriptors, sscd_on_engine
    from pas.curate.report import write_groups_page
    from pas.models.sscd import fingerprint, read_preset

    t0 = time.time()
    preset = read_preset(args.sscd)
    resize = p.resize if p.resize is not None else preset["resize"]
    # PAS_ENGINE=ray: SSCD runs on Ray actors, which load it themselves (machine setting, not a param)
    engine = EngineConfig.from_env()
    model, device = sscd_on_engine(args.sscd, p.device, engine)
    cache = descriptor_cache(args.cache, args.sscd, resize, p.batch_size, device, CHUNK)
    keys, sources, x = folder_descriptors(args.images, model, resize, p.batch_size, device, chunk=CHUNK,
                                          sscd_dir=args.sscd, engine=engine, cache=cache)
    if not keys:                        # nothing to deduplicate is an upstream failure, not a result
        log.error("dedup failed: no images in %s (retrieve and generate wrote none)", " ".join(args.images))
        return 2
    t_desc = time.time() - t0

    knn_info: dict = {}
    manifest = dedup(keys, x, p.lambda_dup, p.k_dup, p.seed, progress=len(keys) > 50_000, index=p.index,
                     nlist=p.nlist, nprobe=p.nprobe, ivf_codes=p.ivf_codes, hnsw_m=p.hnsw_m,
                     ef_search=p.ef_search, use_gpu=p.use_gpu, target_recall=p.target_recall,
                     calib_queries=p.calib_queries, info=knn_info)
    manifest.insert(1, "source", sources)
    metrics = summary(manifest, sources)
    if knn_info:                        # ivf only: lists, nprobe, the calibration's recall estimates
        metrics["knn"] = knn_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "descriptors.npy", x)
    write_parquet(pd.DataFrame({"row": np.arange(len(keys), dtype=np.int64), "key": keys, "source": sources}),
                  out / "keys.parquet", sort_by=None)
    write_json(out / "descriptors.json", {"model_sha256": fingerprint(args.sscd), "resize": resize,
                                          "dims": int(x.shape[1]), "n": len(keys)})
    write_parquet(manifest, out / "manifest.parquet")
    n_groups = write_groups_page(out / "groups.html", manifest, args.images, p.report_groups, p.report_per_group,
                                 metrics)
    # no timings here: prune reads this file as a dep (dataset funnel), so it must change only when
    # the result does; the timing goes to the log line below
    write_metrics(args.metrics, metrics)
    by = metrics["by_source"]
    log.info("dedup: %d in, %d kept (real %d of %d, synthetic %d of %d) in %d groups > 1 (largest %d); "
             "descriptors %.1fs (%.1f img/s on %s), total %.1fs; %d groups in %s",
             metrics["n_in"], metrics["n_kept"], by["real"]["n_kept"], by["real"]["n_in"],
             by["synthetic"]["n_kept"], by["synthetic"]["n_in"], metrics["components_gt1"],
             metrics["largest_component"], t_desc,
             len(keys) / max(t_desc, 1e-9), device, time.time() - t0, n_groups, out / "groups.html")
    warning = collapse_warning("dedup", metrics, "lambda_dup", p.lambda_dup)
    if warning:
        log.warning(warning)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
