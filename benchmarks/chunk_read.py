"""Benchmark: reading one shard in work items (`pas.data.chunks.plan_chunks` + `load_chunk`, the path
dedup / leakage / Ray actors take) vs one plain sequential pass (`iter_samples` + decode).

For each size N a single shard of N small synthetic JPEGs is written with `ShardWriter` into a temp
dir with its index.parquet; both readers check the shard against the index (sha256, count) and decode
every image, and their (key, pixels) streams must be identical. Every timed run starts with empty
per-process caches. Times are best of --repeats, wall and CPU (the machine is shared).

    PYTHONPATH=src python benchmarks/chunk_read.py --sizes 1000 4000 16000 --out benchmarks/RESULTS-chunk-read.md
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from _common import emit
from pas.data.chunks import load_chunk, plan_chunks
from pas.io.shards import ShardWriter, _expected, _sha256, _table, encode_image, iter_samples, write_index


def write_shard(d: Path, n: int, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with ShardWriter(d, prefix="bench", maxcount=n) as w:
        for i in range(n):
            px = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            w.write(f"b{i:07d}", encode_image(Image.fromarray(px)), {"source": "real", "i": i})
    write_index(pd.DataFrame(w.rows), d)       # both readers check the shard against it
    return d


def new_process() -> None:
    """Forget hashed and scanned shards, so every timed run pays what a fresh worker pays."""
    for f in (_sha256, _expected, _table):
        f.cache_clear()


def plain(d: Path) -> str:
    new_process()
    h = hashlib.sha256()
    for s in iter_samples(d):
        h.update(s.key.encode())
        h.update(s.pil().tobytes())
    return h.hexdigest()


def chunked(d: Path, chunk: int) -> str:
    new_process()
    h = hashlib.sha256()
    for item in plan_chunks(d, chunk):
        for key, img in load_chunk(item):
            h.update(key.encode())
            h.update(img.tobytes())
    return h.hexdigest()


def best(fn, repeats: int) -> tuple[float, float, str]:
    wall, cpu, out = float("inf"), float("inf"), ""
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--chunk", type=int, default=512, help="images per work item (dedup's CHUNK)")
    ap.add_argument("--side", type=int, default=32, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="append the table to this markdown file")
    args = ap.parse_args()
    import os

    rows = [f"| N | shard MiB | plain wall (s) | plain CPU (s) | chunked wall (s) | chunked CPU (s) | "
            f"chunked / plain (wall) | same output | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            d = write_shard(Path(tmp), n, args.side, seed=n)
            mib = sum(p.stat().st_size for p in d.glob("*.tar")) / 2**20
            pw, pc, ph = best(lambda: plain(d), args.repeats)
            cw, cc, ch = best(lambda: chunked(d, args.chunk), args.repeats)
        row = (f"| {n:,} | {mib:.1f} | {pw:.3f} | {pc:.3f} | {cw:.3f} | {cc:.3f} | {cw / pw:.2f}x | "
               f"{ph == ch} | {os.getloadavg()[0]:.1f} |")
        rows.append(row)
        print(row, flush=True)
    text = (f"\n{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, chunk={args.chunk}, "
            f"{args.side}x{args.side} JPEGs, best of {args.repeats}\n\n" + "\n".join(rows) + "\n")
    emit(text, args.out, append=True)


if __name__ == "__main__":
    main()
