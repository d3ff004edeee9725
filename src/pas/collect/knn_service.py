"""Backend `clip_service` at LAION scale: a clip-retrieval kNN service queried concurrently, the URLs
it returns downloaded with img2dataset, every step streamed so memory holds one batch, part or shard.

Paper §3.2 / App. D.1.2: k_retrieve = 500 images for each of ~5k concepts from LAION-5B (≈ 2.5M hits).

  1. query     batches of `retrieve.batch_size` concepts, ≤ `service.query_workers` requests in flight
               → <cache>/hits/ (concept, rank, url, caption, similarity, service_id, key), one parquet
               per batch in a `pas.io.resume.WorkStore` keyed by the batch's prompts and the query
               settings: a killed run asks again only for unfinished batches.
  2. dedupe    hits split by key range into parts of ≤ ~`part_hits` hits, each grouped by URL →
               <cache>/urls/part-NNNNN.parquet, one row per URL: sample_key, url, caption and service_id
               of its best hit, concepts + similarities (best first). Keys are sha1 digests of the URL,
               so the ranges are even and the parts in order are the whole list sorted by key.
  3. download  img2dataset (webdataset, incremental: a shard with its `<shard>_stats.json` is not
               fetched again; X-Robots-Tag opt-outs honoured; downscaled to max_side) → <cache>/download/
  4. write     part by part in key order into out_dir through pas.io.shards.IndexedShardWriter:
               retrieved-*.tar, index.parquet, hits.parquet; failed downloads counted by reason.

The cache is not a DVC out (DVC deletes outs before a rerun). A sample's JSON: key, source ("real"),
concepts, similarities, pool_key (None), url, caption, service_id.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pas.collect.clip_client import KnnClient, ServiceParams, query_all
from pas.hashing import sha256_json
from pas.io.resume import read_json
from pas.jsonio import write_json

log = logging.getLogger(__name__)

PART_HITS = 100_000     # hits per dedupe part: what steps 2 and 4 hold in memory at once
OOM_SHARDS = 5          # img2dataset's oom_shard_count: download shards are named 00000..99999
# the query settings that change what the service answers (not timeouts, retries or workers)
QUERY_KEYS = ("url", "indice_name", "query", "modality", "deduplicate", "use_safety_model",
              "use_violence_detector", "aesthetic_score", "aesthetic_weight", "use_mclip")
# the download settings that change what is stored (not timeouts, retries, threads or processes)
DOWNLOAD_KEYS = ("shard_size", "max_side", "max_pixels", "opt_out", "user_agent_token")


class DownloadError(RuntimeError):
    """img2dataset ended without finishing every shard (rerun to resume)."""


def _schemas():
    import pyarrow as pa

    hits = pa.schema([("concept", pa.string()), ("rank", pa.int32()), ("url", pa.string()),
                      ("caption", pa.string()), ("similarity", pa.float64()), ("service_id", pa.string()),
                      ("key", pa.string())])
    index = pa.schema([("key", pa.string()), ("shard", pa.string()), ("pool_key", pa.string()),
                       ("url", pa.string()), ("caption", pa.string()), ("service_id", pa.string()),
                       ("n_concepts", pa.int64()), ("concept", pa.string()), ("similarity", pa.float64()),
                       ("concepts", pa.list_(pa.string())), ("similarities", pa.list_(pa.float64()))])
    return hits, index


# -------------------------------------------------------------------------------------- 1. query
def hits_table(concepts: Sequence[str], results: Sequence[list[dict]], k: int):
    """One batch's hits: per concept its first k distinct URLs, in the service's order (rank 0 =
    best); similarities rounded to 6 decimals (stable metadata)."""
    import pyarrow as pa

    from pas.io.shards import make_key

    cols: dict[str, list] = {n: [] for n in _schemas()[0].names}
    for c, res in zip(concepts, results):
        seen: set[str] = set()
        for r in res:
            if len(seen) >= k:
                break
            if r["url"] in seen:         # same URL twice for one concept: keep the first (best)
                continue
            seen.add(r["url"])
            for name, v in (("concept", c), ("rank", len(seen) - 1), ("url", r["url"]),
                            ("caption", r["caption"] if isinstance(r["caption"], str) else None),
                            ("similarity", round(r["similarity"], 6)),
                            ("service_id", None if r["id"] is None else str(r["id"])),
                            ("key", make_key("r", r["url"]))):
                cols[name].append(v)
    return pa.table(cols, schema=_schemas()[0])


def query_batches(concepts: Sequence[str], prompts: Sequence[str], client: KnnClient, k: int,
                  batch_size: int, hits_dir: Path, run_fp: str, encoder: Any = None,
                  progress: bool = True) -> tuple[dict, list[Path]]:
    """Step 1: query every unfinished batch, each kept in a `pas.io.resume.WorkStore` under `hits_dir`
    by (run fingerprint, its concepts and prompts); returns ({n_batches, n_query_batches_resumed,
    n_hits}, the batches' hit files in order)."""
    from tqdm import tqdm

    from pas.io.resume import Table, WorkStore

    store = WorkStore(hits_dir, run_fp, Table(arrow=True))
    starts = range(0, len(concepts), batch_size)
    paths, n_hits = [], 0
    for s in tqdm(starts, desc="knn-service batches", unit="batch", disable=not progress):
        cs, ps = list(concepts[s:s + batch_size]), list(prompts[s:s + batch_size])
        ident = [cs, ps]
        table = store.get(ident)
        if table is None:
            emb = encoder.encode_texts(ps, batch_size=batch_size) if encoder is not None else None
            table = hits_table(cs, query_all(client, ps, emb, progress=False), k)
            store.put(ident, table)
        n_hits += table.num_rows
        paths.append(store.path(ident))
    store.prune()                            # batches of an earlier concept list
    return {"n_batches": len(starts), "n_query_batches_resumed": store.n_resumed, "n_hits": n_hits}, paths


# ------------------------------------------------------------------------------------- 2. dedupe
def part_of(keys: Sequence[str], n_parts: int) -> np.ndarray:
    """Part of each key `r<16 hex>`: the range its first 32 bits fall in (monotone in the key)."""
    top = np.fromiter((int(k[1:9], 16) for k in keys), dtype=np.uint64, count=len(keys))
    return ((top * np.uint64(n_parts)) >> np.uint64(32)).astype(np.int64)


def split_parts(batches: Sequence[Path], parts_dir: Path, n_parts: int) -> list[Path]:
    """Append each batch's hits to the part files of their key ranges (one batch in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True)
    paths = [parts_dir / f"hits-{p:05d}.parquet" for p in range(n_parts)]
    writers = [pq.ParquetWriter(p, _schemas()[0]) for p in paths]
    try:
        for batch in batches:
            t = pq.read_table(batch)
            part = part_of(t["key"].to_pylist(), n_parts)
            for p in np.unique(part):
                writers[p].write_table(t.filter(pa.array(part == p)))
    finally:
        for w in writers:
            w.close()
    return paths


def group_part(hits):
    """Hits of one part (any order) → (one row per URL sorted by key, the hits sorted the same way).

    A URL's concepts and similarities are best first (similarity descending, then concept); its
    caption and service_id are those of that best hit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    order = pc.sort_indices(hits, sort_keys=[("key", "ascending"), ("similarity", "descending"),
                                             ("concept", "ascending")])
    hits = hits.take(order).combine_chunks()
    n = hits.num_rows
    starts = np.zeros(0, np.int64)
    if n:                                   # a URL's run of hits starts where the key changes
        keys = hits["key"].chunk(0)
        change = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, change])
        urls = hits["url"].chunk(0)
        lead = urls.take(pa.array(np.repeat(starts, np.diff(np.r_[starts, n]))))
        clash = np.flatnonzero(pc.not_equal(lead, urls).to_numpy(zero_copy_only=False))
        if len(clash):
            i = int(clash[0])
            raise ValueError(f"two URLs share the key {keys[i].as_py()!r} (a sha1 prefix collision): "
                             f"{urls[i].as_py()!r}")
    offsets = pa.array(np.r_[starts, n].astype(np.int32))
    first = hits.take(pa.array(starts, type=pa.int64()))
    table = pa.table({"sample_key": first["key"], "url": first["url"], "caption": first["caption"],
                      "service_id": first["service_id"],
                      "concepts": pa.ListArray.from_arrays(offsets, hits["concept"].combine_chunks()),
                      "similarities": pa.ListArray.from_arrays(offsets, hits["similarity"].combine_chunks())})
    return table, hits


def write_url_parts(parts: Sequence[Path], urls_dir: Path) -> list[tuple[Path, int]]:
    """Step 2: the URL list for img2dataset, one file per non-empty part; (path, rows) each."""
    import pyarrow.parquet as pq

    if urls_dir.exists():
        shutil.rmtree(urls_dir)
    urls_dir.mkdir(parents=True)
    out = []
    for i, part in enumerate(parts):
        table, _ = group_part(pq.read_table(part))
        if table.num_rows:
            path = urls_dir / f"part-{i:05d}.parquet"
            pq.write_table(table, path)
            out.append((path, table.num_rows))
    return out


# ----------------------------------------------------------------------------------- 3. download
def failure_reason(status: str, error: str | None) -> str:
    """img2dataset's status + error_message → our reason label."""
    m = (error or "").lower()
    if "x-robots-tag" in m:
        return "opted_out"
    if m.startswith(("http error 404", "http error 410")):
        return "not_found"
    if m.startswith("http error"):
        return "http_error"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "incompleteread" in m or "truncated" in m:
        return "truncated"
    if "image area too large" in m:
        return "too_large"
    if "image too small" in m or "aspect ratio too large" in m:
        return "bad_shape"
    if status == "failed_to_resize":      # cv2 could not decode it (not an image, or a broken one)
        return "not_an_image"
    if "urlopen error" in m or "connection" in m or "unknown url type" in m:
        return "unreachable"
    return "download_error"


def shard_plan(url_parts: Sequence[tuple[Path, int]], shard_size: int) -> list[tuple[int, list[int]]]:
    """img2dataset's shard ids per URL part (it numbers the shards of its input files in order)."""
    plan, sid = [], 0
    for _, n in url_parts:
        k = math.ceil(n / shard_size)
        plan.append((n, list(range(sid, sid + k))))
        sid += k
    return plan


def _shard_name(sid: int) -> str:
    return f"{sid:0{OOM_SHARDS}d}"


# img2dataset runs in a child process: importing it imports torch (through webdataset), ~0.5 GB that
# this process then never holds, and its SIGINT handler (which exits 0 mid-run) stays out of ours
_RUN_IMG2DATASET = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"


def download_kwargs(urls_dir: Path, dl_dir: Path, sp: ServiceParams) -> dict:
    """img2dataset.download arguments: our URL parts in, webdataset shards + per-shard parquet/stats out."""
    return dict(
        url_list=str(urls_dir), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=["sample_key"], output_format="webdataset", output_folder=str(dl_dir),
        processes_count=sp.processes, thread_count=sp.workers, number_sample_per_shard=sp.shard_size,
        oom_shard_count=OOM_SHARDS, image_size=sp.max_side or 256,
        resize_mode="keep_ratio_largest" if sp.max_side else "no", resize_only_if_bigger=True,
        encode_format="jpg", encode_quality=95, max_image_area=sp.max_pixels, timeout=sp.image_timeout,
        retries=sp.retries, extract_exif=False, compute_hash=None, incremental_mode="incremental",
        enable_wandb=False, user_agent_token=sp.user_agent_token,
        disallowed_header_directives=list(sp.opt_out))


def download(urls_dir: Path, dl_dir: Path, sp: ServiceParams) -> None:
    """Step 3: img2dataset over every URL part; shards it already finished are skipped."""
    import subprocess
    import sys

    # NO_ALBUMENTATIONS_UPDATE: albumentations' import would otherwise ask PyPI for a newer release
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    rc = subprocess.run([sys.executable, "-c", _RUN_IMG2DATASET, json.dumps(download_kwargs(urls_dir, dl_dir, sp))],
                        env=env).returncode
    if rc:
        log.warning("img2dataset exited with status %d", rc)


# -------------------------------------------------------------------------------------- 4. write
def write_retrieved(url_parts: Sequence[tuple[Path, int]], hits_parts: Sequence[Path], dl_dir: Path,
                    plan: Sequence[tuple[int, list[int]]], out: Path, maxcount: int, prefix: str,
                    progress: bool = True) -> dict:
    """Step 4: downloaded images → out shards in key order, with index.parquet and hits.parquet."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from pas.io.shards import IndexedShardWriter, read_samples_by_key

    index_schema = _schemas()[1]
    failures: Counter = Counter()
    counts: Counter = Counter()
    n_images = n_unique = 0
    hits_pq = pq.ParquetWriter(out / ".tmp-hits.parquet", pa.schema(
        [("concept", pa.string()), ("rank", pa.int32()), ("key", pa.string()), ("similarity", pa.float64())]))
    bar = tqdm(total=sum(len(s) for _, s in plan), desc="write retrieved", unit="shard", disable=not progress)
    try:
        with IndexedShardWriter(out, index_schema, prefix=prefix, maxcount=maxcount) as w:
            for (path, _), (_, sids) in zip(url_parts, plan):
                cols = pq.read_table(path).to_pydict()     # one part (≤ ~part_hits URLs)
                row_of = {k: i for i, k in enumerate(cols["sample_key"])}
                stored = []
                for sid in sids:
                    st = pq.read_table(dl_dir / f"{_shard_name(sid)}.parquet",
                                       columns=["sample_key", "key", "status", "error_message"]).to_pylist()
                    ok = sorted((r["sample_key"], r["key"]) for r in st if r["status"] == "success")
                    failures.update(failure_reason(r["status"], r["error_message"]) for r in st
                                    if r["status"] != "success")
                    samples = read_samples_by_key(dl_dir / f"{_shard_name(sid)}.tar", [k for _, k in ok])
                    for (key, _), s in zip(ok, samples):
                        i = row_of[key]
                        concepts, sims = cols["concepts"][i], cols["similarities"][i]
                        # what the sample's JSON and its index row both carry
                        both = {"concepts": concepts, "similarities": sims, "pool_key": None, "url": cols["url"][i],
                                "caption": cols["caption"][i], "service_id": cols["service_id"][i]}
                        w.write(key, s.image, {"source": "real", **both}, ext="jpg", row={
                            **both, "n_concepts": len(concepts), "concept": concepts[0], "similarity": sims[0]})
                        counts.update(concepts)
                        n_images += len(concepts)
                        n_unique += 1
                        stored.append(key)
                    bar.update(1)
                _, hits = group_part(pq.read_table(hits_parts[int(path.stem.split("-")[1])]))
                hits = hits.filter(pc.is_in(hits["key"], value_set=pa.array(stored, pa.string())))
                hits_pq.write_table(hits.select(["concept", "rank", "key", "similarity"]))
        hits_pq.close()
        os.replace(out / ".tmp-hits.parquet", out / "hits.parquet")
    finally:
        bar.close()
        hits_pq.close()
        (out / ".tmp-hits.parquet").unlink(missing_ok=True)
    return {"failures": failures, "counts": counts, "n_images": n_images, "n_unique": n_unique}


# ---------------------------------------------------------------------------------------- driver
def retrieve_from_service(concepts: Sequence[str], out_dir: str | Path, cache_dir: str | Path, params: Any,
                          encoder: Any = None, progress: bool = True, part_hits: int = PART_HITS) -> dict:
    """Backend `clip_service` (`params`: pas.collect.retrieve.RetrieveParams). Returns the metrics."""
    from pas.collect.retrieve import OUT_FILES, SHARD_PREFIX, prompt_for, summary
    from pas.io.shards import clean_out, shard_sha256
    from pas.params import ParamsError

    t0 = time.perf_counter()
    sp: ServiceParams = params.service_params()
    cache = Path(cache_dir)
    prompts = [prompt_for(c, params.prompt_template) for c in concepts]
    if sp.query == "embedding" and encoder is None:
        raise ParamsError("retrieve.service.query=embedding needs the configured CLIP")
    run_fp = sha256_json({"k_retrieve": params.k_retrieve, **{k: getattr(sp, k) for k in QUERY_KEYS},
                      "clip": encoder.fingerprint if sp.query == "embedding" else None})
    client = KnnClient(sp, num_images=params.k_retrieve)
    try:
        q, batches = query_batches(concepts, prompts, client, params.k_retrieve, params.batch_size, cache / "hits",
                          run_fp, encoder if sp.query == "embedding" else None, progress)
    finally:
        client.close()
    t_query = time.perf_counter() - t0

    n_parts = max(1, math.ceil(q["n_hits"] / part_hits))
    hits_parts = split_parts(batches, cache / "parts", n_parts)
    url_parts = write_url_parts(hits_parts, cache / "urls")
    plan = shard_plan(url_parts, sp.shard_size)
    all_sids = [sid for _, sids in plan for sid in sids]

    dl_dir = cache / "download"
    dl_fp = sha256_json({"urls": [(p.name, shard_sha256(p)) for p, _ in url_parts],
                     **{k: getattr(sp, k) for k in DOWNLOAD_KEYS}})
    if read_json(cache / "download.json") != {"fingerprint": dl_fp}:
        shutil.rmtree(dl_dir, ignore_errors=True)      # another URL list: its shards mean nothing now
        write_json(cache / "download.json", {"fingerprint": dl_fp}, indent=None, newline=False, atomic=True)
    resumed = sum((dl_dir / f"{_shard_name(s)}_stats.json").is_file() for s in all_sids)
    t1 = time.perf_counter()
    if len(all_sids) > resumed:
        log.info("retrieve: downloading %d of %d shards (%d done before) with img2dataset",
                 len(all_sids) - resumed, len(all_sids), resumed)
        download(cache / "urls", dl_dir, sp)
    missing = [s for s in all_sids if not (dl_dir / f"{_shard_name(s)}_stats.json").is_file()]
    if missing:
        raise DownloadError(f"img2dataset finished {len(all_sids) - len(missing)} of {len(all_sids)} download "
                            f"shards ({dl_dir}/{_shard_name(missing[0])} and {len(missing) - 1} more failed, "
                            "see its log); rerun to resume")
    t_download = time.perf_counter() - t1

    out = Path(out_dir)
    clean_out(out, SHARD_PREFIX, OUT_FILES)
    w = write_retrieved(url_parts, hits_parts, dl_dir, plan, out, params.shard_size, SHARD_PREFIX, progress)
    m = summary(concepts, w["counts"], w["n_images"], w["n_unique"])
    m.update(backend="clip_service", k_retrieve=params.k_retrieve, n_hits=q["n_hits"],
             n_urls=sum(n for _, n in url_parts), n_downloaded=w["n_unique"],
             n_download_failed=sum(w["failures"].values()), n_download_shards=len(all_sids),
             n_query_batches_resumed=q["n_query_batches_resumed"], n_download_shards_resumed=resumed,
             seconds_query=t_query, seconds_download=t_download, seconds=time.perf_counter() - t0,
             **{f"dropped_{r}": n for r, n in sorted(w["failures"].items())})
    return m


__all__ = ["retrieve_from_service", "hits_table", "group_part", "part_of", "failure_reason", "shard_plan",
           "DownloadError", "PART_HITS"]
