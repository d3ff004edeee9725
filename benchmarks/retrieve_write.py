"""retrieve's pool backend after the faiss search at N images: `merge_hits` + `write_images` +
`write_index`, baseline vs current.

Each (version, N) runs in a fresh child process with that version's src/ first on sys.path: it builds
synthetic top-k lists (1-3 distinct of 1,000 concepts per image, as faiss returns them: best first,
-1 padded), merges them and streams N samples as `_pool_samples` does (hashed keys in pool order, one
~1.2 KB image blob, a pool path, none for every 10th), then writes data/retrieved's shards,
index.parquet and hits.parquet. Peak RSS is the child's `ru_maxrss`, "before" its high-water mark
before the merge; the sha256 over the output files checks that both versions write the same bytes.

    PYTHONPATH=src python benchmarks/retrieve_write.py --sizes 100000 1000000 --baseline /tmp/base/src
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARD_MAX, CONCEPTS, IMAGE_BYTES = 10_000, 1_000, 1_200


def run_one(n: int, out: Path) -> dict:
    import numpy as np
    import pandas  # noqa: F401  imported before "before", as the stage has them
    import pyarrow.parquet  # noqa: F401
    import tqdm  # noqa: F401

    from pas.collect.retrieve import merge_hits, write_images, write_index
    from pas.io import manifest, shards  # noqa: F401

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (MB)
    rng = np.random.default_rng(0)
    keys = np.array(["p" + hashlib.sha1(str(i).encode()).hexdigest()[:16] for i in range(n)], dtype=object)
    n_hits, sims = rng.integers(1, 4, n), rng.uniform(0.2, 0.4, (n, 3)).astype(np.float32)
    conc = (rng.integers(0, CONCEPTS, n)[:, None] + 7 * np.arange(3)) % CONCEPTS   # distinct per image
    img = np.repeat(np.arange(n), n_hits)
    slot = np.arange(len(img)) - np.repeat(np.cumsum(n_hits) - n_hits, n_hits)
    hit_c, hit_s = conc[img, slot], sims[img, slot]
    # each concept's top-k as faiss returns it: best first, -1 past its last hit
    order = np.lexsort((-hit_s, hit_c))
    per = np.bincount(hit_c, minlength=CONCEPTS)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(per) - per, per)
    S = np.zeros((CONCEPTS, per.max()), np.float32)
    I = np.full(S.shape, -1, np.int64)
    S[hit_c[order], rank], I[hit_c[order], rank] = hit_s[order], img[order]
    concepts = [f"concept {c}" for c in range(CONCEPTS)]
    image = rng.integers(0, 256, IMAGE_BYTES, dtype=np.uint8).tobytes()
    samples = ((k, image, "jpg", {"pool_key": k, "path": None if i % 10 == 0 else f"img/{i}.jpg"})
               for i, k in enumerate(keys.tolist()))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
    hits = merge_hits(concepts, S, I, keys)
    written = write_images(samples, hits, out, SHARD_MAX, total=n)
    write_index(written, hits, out)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    h = hashlib.sha256()
    for p in sorted(out.iterdir()):
        h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    shutil.rmtree(out)
    return {"n": n, "seconds": round(dt, 3), "cpu_s": round(cpu, 3), "peak_rss_mb": round(rss(), 1),
            "rss_before_mb": round(rss0, 1), "sha256": h.hexdigest()[:16]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--baseline", help="src/ of the version to compare with (e.g. a `git archive` of main)")
    ap.add_argument("--root", default="/tmp/pas-retrieve-write", help="output folder (deleted after each run)")
    ap.add_argument("--json", help="append one JSON line per run to this file")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.root))))
        return 0
    here = str(Path(__file__).resolve().parents[1] / "src")
    versions = ([("baseline", args.baseline)] if args.baseline else []) + [("current", here)]
    print("| version | N | seconds | CPU s | peak RSS MB | RSS before MB | peak − before MB | load | sha256 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for name, src in versions:          # alternating, so both see the same machine load
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
            r = subprocess.run([sys.executable, __file__, "--one", str(n), "--root", f"{args.root}/{name}"],
                               env=env, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            res = {"version": name, **json.loads(r.stdout.strip().splitlines()[-1]),
                   "load1": round(os.getloadavg()[0], 2)}
            print(f"| {name} | {n:,} | {res['seconds']} | {res['cpu_s']} | {res['peak_rss_mb']} | "
                  f"{res['rss_before_mb']} | {res['peak_rss_mb'] - res['rss_before_mb']:.1f} | {res['load1']} | "
                  f"{res['sha256']} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
