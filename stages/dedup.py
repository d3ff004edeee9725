"""DVC stage `dedup`: SSCD copy detection over retrieved + generated images (paper §3.3, App. D.1.4).

Reads the retrieved and generated shard folders and the SSCD model folder; writes to `--out`:
  manifest.parquet   key, source, kept, reason, score, component, component_size, representative
  descriptors.npy    float32 (N, D) SSCD descriptors, rows in the order of keys.parquet
  keys.parquet       row, key, source (the descriptor order; `leakage` reuses the descriptors)
  descriptors.json   model sha256, resize, dims, n (consumers check they use the same model)
  groups.html        the largest duplicate groups as thumbnails (paper Fig. 9/12), opens offline
and `metrics/dedup.json` (n_in, n_out, n_removed, components_gt1, largest_component, removed_real,
removed_synthetic).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pas.curate.dedup import DedupParams, dedup, summary
from pas.engine import EngineConfig
from pas.io.manifest import write_metrics, write_parquet
from pas.models.files import write_json
from pas.params import build, load, run_stage

log = logging.getLogger("pas.stages.dedup")
CHUNK = 512          # images decoded at a time (descriptors run in batch_size batches inside)


def compute_descriptors(dirs: list[str], model, resize, batch_size: int, device: str, sscd_dir: str = "",
                        engine=None, cache=None):
    """Descriptors of every sample of the shard folders `dirs`, in stored order.

    Samples are cut into chunks of CHUNK in stored order (a chunk may span shards and folders) and
    each chunk is one `descriptors` call, on the engine of `engine` (PAS_ENGINE; see pas.engine): the
    chunks, hence the batches, are the same on either engine, so are the bytes. Ray actors load SSCD
    from `sscd_dir`. With `cache` (a `pas.io.resume.ChunkCache`) a chunk finished by an earlier,
    killed run is read back instead of recomputed, and each chunk is stored as soon as it is done.
    Returns (keys, sources, descriptors float32 (N, D))."""
    from tqdm import tqdm

    from pas.data.chunks import shard_spans
    from pas.engine import map_shards
    from pas.io.shards import iter_samples, list_shards
    from pas.models.sscd import ChunkDescriptors

    keys: list[str] = []
    sources: list[str] = []
    shards, counts = [], []
    for d in dirs:
        default_source = "synthetic" if "generated" in Path(d).name else "real"
        if not Path(d).is_dir():
            raise FileNotFoundError(f"{d}: image folder does not exist")
        for shard in list_shards(d):
            shards.append(shard)
            n0 = len(keys)
            for s in tqdm(iter_samples(shard), desc=f"index {shard.name}", unit="img", leave=False):
                keys.append(s.key)
                sources.append(str(s.meta.get("source", default_source)))
            counts.append(len(keys) - n0)
    chunks = shard_spans(shards, CHUNK, counts)
    parts: list = [None] * len(chunks)
    todo = list(range(len(chunks)))
    if cache is not None:
        from pas.io.resume import file_identity

        ident = {str(s): file_identity(s) for s in shards}
        ids = [[[ident[shard], start, stop] for shard, start, stop in c[1]] for c in chunks]
        for i in range(len(chunks)):
            parts[i] = cache.get(ids[i])
        todo = [i for i in range(len(chunks)) if parts[i] is None]
        if len(todo) < len(chunks):
            log.info("dedup: %d of %d descriptor chunks resumed from %s", len(chunks) - len(todo), len(chunks),
                     cache.root)

    def done(j: int, result) -> None:
        parts[todo[j]] = result
        if cache is not None:
            cache.put(ids[todo[j]], *result)

    map_shards(ChunkDescriptors(sscd_dir, resize, batch_size, device, model=model), [chunks[i] for i in todo],
               config=engine, on_result=done, desc="sscd chunks")
    got = [k for part_keys, _ in parts for k in part_keys]
    if got != keys:
        raise ValueError(f"{dirs}: shards changed while their descriptors were computed")
    x = np.concatenate([xp for _, xp in parts]) if parts else np.zeros((0, 0), np.float32)
    return keys, sources, x


def write_groups_page(path: Path, manifest: pd.DataFrame, dirs: list[str], p: DedupParams, metrics: dict) -> int:
    from pas.curate.report import groups_html, largest_groups
    from pas.io.shards import iter_samples

    groups = largest_groups(manifest, p.report_groups, p.report_per_group)
    wanted = {k for g in groups for k in g["keys"]}
    images = {}
    if wanted:
        for d in dirs:
            for s in iter_samples(d):
                if s.key in wanted:
                    images[s.key] = s.image
    info = manifest.set_index("key")[["source", "score"]].loc[sorted(wanted)].to_dict("index") if wanted else {}
    path.write_text(groups_html(groups, images, info, summary=metrics))
    return len(groups)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", default=["data/retrieved", "data/generated"],
                    help="webdataset shard folders (retrieved, generated)")
    ap.add_argument("--sscd", default="models/sscd", help="SSCD folder from the models stage")
    ap.add_argument("--out", default="data/dedup")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="metrics/dedup.json")
    ap.add_argument("--cache", default="data/.cache/dedup",
                    help="scratch folder keeping finished descriptor chunks across killed runs (not a DVC out); "
                         "'' disables it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = build(DedupParams, load(args.params), "dedup")

    from pas.models.sscd import fingerprint, load_sscd, read_preset, resolve_device

    t0 = time.time()
    preset = read_preset(args.sscd)
    resize = p.resize if p.resize is not None else preset["resize"]
    # PAS_ENGINE=ray: SSCD runs on Ray actors, which load it themselves (machine setting, not a param)
    engine = EngineConfig.from_env()
    # with Ray, `device: auto` is resolved by each actor on its own node (the driver may have no GPU)
    device = resolve_device(p.device) if engine.engine == "local" else p.device
    model = load_sscd(args.sscd, device=device) if engine.engine == "local" else None
    cache = None
    if args.cache:
        from importlib.metadata import version

        from pas.io.resume import ChunkCache

        # what a chunk's descriptors depend on besides its images: the model, input size, batching,
        # device and torch (CPU and GPU kernels round differently)
        run_fp = json.dumps({"model": fingerprint(args.sscd), "resize": resize, "batch_size": p.batch_size,
                             "device": device, "torch": version("torch"), "chunk": CHUNK}, sort_keys=True,
                            default=str)
        cache = ChunkCache(args.cache, run_fp)
    keys, sources, x = compute_descriptors(args.images, model, resize, p.batch_size, device,
                                           sscd_dir=args.sscd, engine=engine, cache=cache)
    if not keys:                        # nothing to deduplicate is an upstream failure, not a result
        log.error("dedup failed: no images in %s (retrieve and generate wrote none)", " ".join(args.images))
        return 2
    if cache is not None:
        cache.prune()                       # chunks of earlier inputs or settings
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
    np.save(out / "descriptors.npy", x if len(x) else np.zeros((0, preset.get("dims", 512)), np.float32))
    write_parquet(pd.DataFrame({"row": np.arange(len(keys), dtype=np.int64), "key": keys, "source": sources}),
                  out / "keys.parquet", sort_by=None)
    write_json(out / "descriptors.json", {"model_sha256": fingerprint(args.sscd),
                                          "resize": resize, "dims": int(x.shape[1]) if len(x) else None,
                                          "n": len(keys)})
    write_parquet(manifest, out / "manifest.parquet")
    n_groups = write_groups_page(out / "groups.html", manifest, args.images, p, metrics)
    # no timings here: prune reads this file as a dep (dataset funnel), so it must change only when
    # the result does; the timing goes to the log line below
    write_metrics(args.metrics, metrics)
    log.info("dedup: %d in, %d kept, %d removed (%d real, %d synthetic) in %d groups > 1 (largest %d); "
             "descriptors %.1fs (%.1f img/s on %s), total %.1fs; %d groups in %s",
             metrics["n_in"], metrics["n_out"], metrics["n_removed"], metrics["removed_real"],
             metrics["removed_synthetic"], metrics["components_gt1"], metrics["largest_component"], t_desc,
             len(keys) / max(t_desc, 1e-9), device, time.time() - t0, n_groups, out / "groups.html")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
