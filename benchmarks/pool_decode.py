"""Benchmark: the pool stage's throughput, part by part, in one run (issue 24).

N openclipart PNGs (every k-th file of the sorted default pool, copied into a temp folder with their
category folders) go through, each timed in images/s (best of --repeats, this process and its
spawned workers; the machine is shared, so the load average is printed):

  decode       `Image.open(path).load()`: a plain decode, nothing else
  prepare@W    `pas.data.pool.decode_chunk` over the chunks in W worker processes (`decoded_chunks`,
               what the stage runs): header check, decode, composite on white, resize, JPEG re-encode
  clip         `embed_jpegs` on the stored JPEGs: decode them + CLIP image tower in `batch_size`
               batches (models/clip, the pool's CLIP), main process only
  stage@W      `build_pool` (no resume cache) with `workers: W`, shards + embeddings + faiss index

The stage is decode-bound when prepare@W is slower than clip (the main process waits for chunks),
model-bound otherwise; `build_pool` also reports the seconds it waited for decoded chunks and spent
embedding them. Every stage@W run must write the same bytes.

    PYTHONPATH=src python benchmarks/pool_decode.py --n 1024 --clip /work/main/models/clip \\
        --out benchmarks/RESULTS-pool-decode.md
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from _common import emit


def sample_pool(src: Path, dst: Path, n: int) -> list[Path]:
    files = sorted(p for p in src.rglob("*.png") if p.is_file() and not p.is_symlink())
    step = max(1, len(files) // n)
    picked = files[::step][:n]
    for f in picked:
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
    return [dst / f.relative_to(src) for f in picked]


def best(fn, repeats: int):
    wall, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        wall = min(wall, time.perf_counter() - t0)
    return wall, out


def plain_decode(files: list[Path]) -> int:
    n = 0
    for f in files:
        try:
            with Image.open(f) as im:
                if im.size[0] * im.size[1] <= 50_000_000:   # the pool's header check: no bombs
                    im.load()
                    n += 1
        except Exception:  # noqa: BLE001 - broken files count as nothing, as in the pool
            pass
    return n


def prepare(items, p) -> list[bytes]:
    from pas.data.pool import decoded_chunks

    return [j for _, (_, jpegs) in decoded_chunks(items, p, set(range(len(items)))) for j in jpegs]


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="/usr/share/openclipart/png")
    ap.add_argument("--clip", default="models/clip")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=256, help="params.yaml pool.max_side")
    ap.add_argument("--batch-size", type=int, default=64, help="pool.batch_size (PoolParams default)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="append the table to this markdown file")
    args = ap.parse_args()

    import torch

    from pas.data.pool import CHUNK, PoolParams, build_pool, embed_jpegs, plan_chunks
    from pas.models.clip import load_clip

    clip = load_clip(args.clip)
    rows = ["| step | workers | images | wall (s), best | images/s | note |", "|---|---|---|---|---|---|"]

    def row(step, w, n, secs, note=""):
        line = f"| {step} | {w} | {n} | {secs:.2f} | {n / secs:.0f} | {note} |"
        rows.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = sample_pool(Path(args.source), tmp / "src", args.n)
        p = PoolParams(source=str(tmp / "src"), max_side=args.max_side, batch_size=args.batch_size)
        items = plan_chunks(p, [])
        secs, n_ok = best(lambda: plain_decode(files), args.repeats)
        row("decode", 1, n_ok, secs, "Image.open + load")
        t_decode = secs / max(n_ok, 1)
        jpegs, t_prep = None, {}
        for w in args.workers:
            pw = PoolParams(**{**p.__dict__, "workers": w})
            secs, jpegs = best(lambda: prepare(items, pw), args.repeats)
            t_prep[w] = secs
            row("prepare", w, len(jpegs), secs,
                f"{secs / len(jpegs) / t_decode:.2f}x a plain decode per image" if w == 1 else "spawned processes")
        secs, _ = best(lambda: embed_jpegs(clip, jpegs, args.batch_size), args.repeats)
        t_clip = secs
        row("clip", 1, len(jpegs), secs, f"torch threads {torch.get_num_threads()}, batch {args.batch_size}")
        digests = {}
        for w in args.workers:
            pw = PoolParams(**{**p.__dict__, "workers": w})
            out = tmp / f"out{w}"
            secs, m = best(lambda: build_pool(pw, clip, out), args.repeats)
            digests[w] = digest(out)
            row("stage", w, m["n_indexed"], secs, f"waited {m['seconds_decode_wait']:.1f} s for decoding, "
                f"embedded {m['seconds_embed']:.1f} s; outputs {digests[w]}")
    w_best = min(t_prep, key=t_prep.get)
    bound = "decode-bound" if t_prep[w_best] > t_clip else "model-bound"
    text = (f"\n{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
            f"torch {torch.__version__}, CLIP {args.clip} (dim {clip.dim}), N={args.n} openclipart PNGs, "
            f"max_side {args.max_side}, CHUNK {CHUNK}, best of {args.repeats}, load avg "
            f"{os.getloadavg()[0]:.1f}\n\n" + "\n".join(rows) + "\n\n"
            f"Same bytes for every worker count: {len(set(digests.values())) == 1}. With {w_best} worker(s) "
            f"preparing takes {t_prep[w_best]:.2f} s and CLIP {t_clip:.2f} s: **{bound}**.\n")
    emit(text, args.out, append=True)


if __name__ == "__main__":
    main()
