"""SSCD descriptors of image folders, as dedup and leakage compute them: cut into chunks of stored order
(`pas.data.chunks`), each chunk one `pas.models.sscd.ChunkDescriptors` call on the engine (local or Ray
actors), each finished chunk kept in a `WorkStore` so a killed run resumes (`pas.engine.map_resumable`).

The chunks, hence the batches, depend only on the stored order and `chunk`, so the bytes are the same on
either engine and after a resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def sscd_on_engine(sscd_dir: str | Path, device: str, engine):
    """(model, device) for this process: locally the loaded SSCD on the resolved device; with Ray, no
    model and `device` as asked, since each actor loads SSCD and resolves `auto` on its own node (the
    driver may have no GPU)."""
    from pas.device import resolve_device
    from pas.models.sscd import load_sscd

    if engine is not None and engine.engine != "local":
        return None, device
    device = resolve_device(device)
    return load_sscd(sscd_dir, device=device), device


def descriptor_cache(root: str | Path | None, sscd_dir: str | Path, resize, batch_size: int, device: str,
                     chunk: int, max_side: int | None = None):
    """The `WorkStore` under `root` ('' / None: no resume) for one model and its settings: what a chunk's
    descriptors depend on besides its images are the model, input size, batching, device and torch
    (CPU and GPU kernels round differently)."""
    if not root:
        return None
    from importlib.metadata import version

    from pas.io.resume import WorkStore
    from pas.models.sscd import fingerprint

    run_fp = {"model": fingerprint(sscd_dir), "resize": resize, "batch_size": batch_size, "device": device,
              "torch": version("torch"), "chunk": chunk}
    if max_side is not None:
        run_fp["max_side"] = max_side
    return WorkStore(root, json.dumps(run_fp, sort_keys=True, default=str))


def _map(items: list, model, resize, batch_size: int, device: str, sscd_dir, max_side, engine, cache,
         desc: str) -> list:
    from pas.engine import map_resumable
    from pas.io.resume import chunk_identity
    from pas.models.sscd import ChunkDescriptors

    ids = [chunk_identity(item) for item in items] if cache is not None else [None] * len(items)
    work = ChunkDescriptors(sscd_dir, resize, batch_size, device, max_side=max_side, model=model)
    parts = map_resumable(work, items, ids, cache, config=engine, desc=desc)
    if cache is not None:
        cache.prune()                       # chunks of earlier inputs or settings
    return parts


def folder_descriptors(dirs: list[str], model, resize, batch_size: int, device: str, *, chunk: int,
                       sscd_dir: str = "", engine=None, cache=None):
    """Descriptors of every sample of the shard folders `dirs` (dedup's inputs), in stored order; a chunk
    may span shards and folders. A sample's source is its JSON's `source`, else the folder's ("generated"
    in its name: synthetic). Returns (keys, sources, descriptors float32 (N, D))."""
    from tqdm import tqdm

    from pas.data.chunks import shard_spans
    from pas.io.shards import iter_samples, list_shards

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
    parts = _map(shard_spans(shards, chunk, counts), model, resize, batch_size, device, sscd_dir, None, engine,
                 cache, "sscd chunks")
    got = [k for part_keys, _ in parts for k in part_keys]
    if got != keys:
        raise ValueError(f"{dirs}: shards changed while their descriptors were computed")
    x = np.concatenate([xp for _, xp in parts]) if parts else np.zeros((0, 0), np.float32)
    return keys, sources, x


def set_descriptors(sets: dict[str, Path], model, resize, batch_size: int, device: str, *, chunk: int,
                    max_side: int | None = None, sscd_dir: str = "", engine=None, cache=None):
    """Descriptors of every eval set's test images (leakage), set by set, in stored order: webdataset
    shards or image files (`plan_chunks`). Returns (keys, set names, descriptors or None, test images
    per set)."""
    from pas.data.chunks import plan_chunks

    items, owner = [], []
    for name, d in sets.items():
        for item in plan_chunks(d, chunk):
            items.append(item)
            owner.append(name)
    parts = _map(items, model, resize, batch_size, device, sscd_dir, max_side, engine, cache, "sscd test chunks")
    keys, names, xs = [], [], []
    n_test = {name: 0 for name in sets}
    for name, (part_keys, x) in zip(owner, parts):
        keys += part_keys
        names += [name] * len(part_keys)
        n_test[name] += len(part_keys)
        if len(part_keys):
            xs.append(x)
    for name, n in n_test.items():
        if n == 0:
            log.warning("eval set %s: no test images in %s", name, sets[name])
    return keys, names, (np.concatenate(xs) if xs else None), n_test
