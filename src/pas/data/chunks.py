"""Image folders cut into work items that any process can load: the unit `pas.engine.map_shards`
sends to a Ray actor (or maps in-process). Items carry paths and sample positions, never pixels.

    ("shards", [(shard.tar, start, stop), ...])   webdataset samples start..stop of each shard
    ("files", folder, [relative path, ...])        files of an ImageFolder / flat folder

The cut depends only on the stored order, so every engine computes the same batches (and bytes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def shard_spans(shards, chunk: int, counts=None) -> list[tuple]:
    """Samples of `shards` (in order) cut every `chunk` samples; an item may span shards.
    `counts`: samples per shard when the caller has counted them (else they are counted here)."""
    from pas.io.shards import count_samples

    if counts is None:
        counts = [count_samples(shard) for shard in shards]
    items, spans, room = [], [], chunk
    for shard, n in zip(shards, counts):
        start = 0
        while n - start >= room:             # this shard fills the current item
            spans.append((str(shard), start, start + room))
            items.append(("shards", spans))
            start += room
            spans, room = [], chunk
        if n > start:
            spans.append((str(shard), start, n))
            room -= n - start
    if spans:
        items.append(("shards", spans))
    return items


def plan_chunks(d: str | Path, chunk: int) -> list[tuple]:
    """A folder of webdataset shards, or of image files (recursively, sorted by path), in items of
    ≤ `chunk` images, without decoding any."""
    from pas.io.shards import list_shards

    d = Path(d)
    shards = list_shards(d)
    if shards:
        return shard_spans(shards, chunk)
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [("files", str(d), files[i:i + chunk]) for i in range(0, len(files), chunk)]


def load_chunk(item: tuple, max_side: int | None = None) -> Iterator[tuple[str, object]]:
    """(key, PIL RGB) of one item, in order. Shard samples are decoded as stored; files go through
    `load_rgb` (composited on white, longer side ≤ max_side) and unreadable ones are skipped with a
    warning (key = the path relative to the folder)."""
    from pas.data.images import BadImage, load_rgb
    from pas.io.shards import read_samples

    if item[0] == "shards":
        for shard, start, stop in item[1]:
            for s in read_samples(shard, start, stop):      # seeks to `start`: O(chunk), not O(shard)
                yield s.key, s.pil()
        return
    if item[0] != "files":
        raise ValueError(f"unknown chunk kind {item[0]!r}")
    _, d, files = item
    for rel in files:
        try:
            img = load_rgb(Path(d) / rel, max_side=max_side)
        except BadImage as e:
            log.warning("skipping %s (%s)", Path(d) / rel, e.reason)
            continue
        yield rel, img
