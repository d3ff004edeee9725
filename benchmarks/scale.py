"""Scale benchmark: the CPU-side path of the pipeline on synthetic data at N images (issue 24).

Steps, each the library call its stage makes, on data made once per N (seeded) under --root/N:
  shards       write N tiny JPEGs (32×32) + JSON as webdataset shards (`ShardWriter`, ≤ 10k per shard)
               and their index.parquet (`write_index`), as the pool/retrieve stages do; encode included
  chunks       the dedup stage's read path: one index pass over every shard (`iter_samples`), cut into
               descriptor chunks of 512 (`shard_spans`), each chunk loaded and decoded (`load_chunk`)
  dedup        `pas.curate.dedup.dedup`: kNN (k 64, λ 0.6, --dedup-index, default the shipped `flat`)
               + λ-graph + components on N × --dim clustered descriptors with planted copies
  dedup_graph  `dedup_from_knn` alone (graph + components + manifest) on a synthetic N × 64 kNN result
  leakage      `leakage` (kNN of N descriptors among --test images, k 32, λ 0.45) + `by_component`
  ood          `three_scores` (OOD_B, OOD_B', blur delta) on synthetic unit embeddings (--ood-dim) against
               --concepts yes/no concept embeddings and 5 for B', in batches of 64 as the stage calls it
  prune        `select` (worst-first Pareto fronts + kneedle stop) on N synthetic score triples
  export       `export_dataset`: the kept ~70% of the shards step's images sorted by key into the final
               shards + index.parquet (--sort-buffer-mb, default the shipped 1 GiB; a small one makes the
               write step, the index among it, the peak)

Each step at each N runs in a fresh subprocess whose `ru_maxrss` is the step's peak RSS; "before" is
its high-water mark after imports and loading the inputs. The data are made in a subprocess too (a
child inherits its parent's high-water mark), so the parent stays small. Over the sizes run, b in
t ∝ N^b and in (peak − before) ∝ N^b are least-squares fits in log-log; b > 1.15 is flagged. A step
whose time, extrapolated from the sizes already run with b (at least 1), would exceed --max-seconds
is skipped with a note (exact dedup is quadratic: 1M × 512 on two cores takes hours).

    PYTHONPATH=src python benchmarks/scale.py --sizes 10000 100000 1000000 --json benchmarks/results-scale.json
    PYTHONPATH=src python benchmarks/scale.py --sizes 500 2000 --steps prune export --root /tmp/s
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("shards", "chunks", "dedup", "dedup_graph", "leakage", "ood", "prune", "export")
NEEDS_IMAGES = ("chunks", "export")
SHARD_MAX, CHUNK, SIDE = 10_000, 512, 32
K_DUP, LAMBDA_DUP, K_LEAK, LAMBDA_LEAK = 64, 0.6, 32, 0.45
OOD_BATCH, OOD_BANK, N_BPRIME = 64, 16_384, 5
SUPER_LINEAR = 1.15
DATA_BLOCK = 100_000


def key_of(i: int) -> str:
    # hashed like `make_key`, so the stored order is not the key order (export must sort)
    return "r" + hashlib.sha1(str(i).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- data (child)

def make_data(n: int, d: Path, dim: int, n_test: int, seed: int) -> None:
    """Every step's array inputs for N = n, saved as .npy / parquet under `d` (images: the shards step)."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).parent))
    import dedup as dedup_bench     # benchmarks/dedup.py: clusters + planted copy groups

    # a stream of its own: default_rng(seed) is the one benchmarks/dedup.py draws its centres from
    rng = np.random.default_rng([seed, 1])
    d.mkdir(parents=True, exist_ok=True)
    keys = [key_of(i) for i in range(n)]
    pd.DataFrame({"key": keys}).to_parquet(d / "keys.parquet")

    # dedup / leakage descriptors from benchmarks/dedup.py's generator (module constant D = dim), in
    # blocks of ≤ 100k with their own seed and clusters, so making 1M × 512 holds one block's copies
    dedup_bench.D = dim
    x = np.lib.format.open_memmap(d / "x.npy", "w+", np.float32, (n, dim))
    group = np.empty(n, np.int64)
    for b, s in enumerate(range(0, n, DATA_BLOCK)):
        xb, gb = dedup_bench.make_data(min(DATA_BLOCK, n - s), seed + b)
        x[s:s + len(xb)] = xb
        group[s:s + len(xb)] = np.where(gb >= 0, gb + s, -1)     # group ids unique across blocks
    x.flush()
    # test images: near-copies of 1% of them (cos ≈ 0.9 > λ_leak) and the rest fresh random rows
    n_copy = min(n_test, max(1, n // 100))
    xt = rng.standard_normal((n_test, dim)).astype(np.float32)
    xt[:n_copy] = x[rng.choice(n, n_copy, replace=False)] + 0.33 * xt[:n_copy] / np.sqrt(dim)
    xt /= np.linalg.norm(xt, axis=1, keepdims=True)
    np.save(d / "xt.npy", xt)
    # dedup's verdict for leakage: the planted groups are components, their first member kept
    comp = np.where(group >= 0, group, group.max() + 1 + np.arange(n))
    _, first = np.unique(comp, return_index=True)
    kept = np.zeros(n, bool)
    kept[first] = True
    np.save(d / "comp.npy", comp)
    np.save(d / "kept.npy", kept)

    # a kNN result as knn_self returns it: 64 neighbours per row, sims descending, below λ except
    # each row's planted partner (10% of rows in pairs)
    ids = rng.integers(0, n, (n, K_DUP), dtype=np.int64)
    sims = np.sort(rng.uniform(0.1, 0.55, (n, K_DUP)).astype(np.float32), axis=1)[:, ::-1]
    pairs = rng.permutation(n)[: (n // 10) * 2].reshape(-1, 2)
    ids[pairs[:, 0], 0], ids[pairs[:, 1], 0] = pairs[:, 1], pairs[:, 0]
    sims[pairs[:, 0], 0] = sims[pairs[:, 1], 0] = 0.9
    np.save(d / "knn_sims.npy", np.ascontiguousarray(sims))
    np.save(d / "knn_ids.npy", ids)

    # ood: a bank of unit image embeddings the batches cycle through, and concept yes/no embeddings
    bank = rng.standard_normal((OOD_BANK, ood_dim_of(d)))
    np.save(d / "ood_bank.npy", (bank / np.linalg.norm(bank, axis=1, keepdims=True)).astype(np.float32))

    # prune: three scores per image (B' tracks B; 80% have no text, so their blur delta is exactly 0)
    base = rng.random(n)
    has_text = rng.random(n) < 0.2
    scores = pd.DataFrame({"key": keys, "ood_b": base,
                           "ood_bprime": np.clip(base + 0.1 * rng.standard_normal(n), 0, 1),
                           "ood_blur_delta": np.where(has_text, 0.2 * rng.standard_normal(n), 0.0),
                           "text_boxes": np.where(has_text, rng.integers(1, 5, n), 0).astype(np.int32)})
    scores.to_parquet(d / "scores.parquet")
    # export: a ranked table as `select` leaves it, ~30% removed
    front = rng.integers(0, 100, n)
    scores.assign(front=front, removed=front < 30).to_parquet(d / "table.parquet")


def tree_sha256(d: Path) -> str:
    """A short sha256 over a folder's file names and bytes (untimed): versions must write the same."""
    from pas.hashing import sha256_file

    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        h.update(p.name.encode() + bytes.fromhex(sha256_file(p)))
    return h.hexdigest()[:16]


def ood_dim_of(d: Path) -> int:
    return json.loads((d / "config.json").read_text())["ood_dim"]


def tiny_jpeg(rng) -> bytes:
    import numpy as np
    from PIL import Image

    from pas.io.shards import encode_image

    # an 8×8 random image upsampled to 32×32: ~1.2 KB at quality 95, like a small photo thumbnail
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return encode_image(small.resize((SIDE, SIDE), Image.BILINEAR))


# ------------------------------------------------------------------------------------ steps (child)

def run_step(step: str, n: int, d: Path, sort_buffer_mb: int = 1024) -> dict:
    import numpy as np
    import pandas as pd

    cfg = json.loads((d / "config.json").read_text())
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (MB)
    extra: dict = {}

    if step == "shards":
        from pas.io.shards import ShardWriter, write_index

        out = d / "images"
        shutil.rmtree(out, ignore_errors=True)
        rng = np.random.default_rng(cfg["seed"])
        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        with ShardWriter(out, prefix="pool", maxcount=SHARD_MAX) as w:
            for i in range(n):
                meta = {"source": "real", "concepts": [f"concept {i % 997}"], "similarities": [0.31],
                        "caption": f"a photo of thing {i}", "url": f"https://example.org/{i}.jpg"}
                w.write(key_of(i), tiny_jpeg(rng), meta)
        write_index(w.index_frame(), out)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra["MB_on_disk"] = round(sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20, 1)
        extra["sha256"] = tree_sha256(out)

    elif step == "chunks":
        from pas.data.chunks import load_chunk, shard_spans
        from pas.io.shards import iter_samples, list_shards

        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        shards = list_shards(d / "images")
        counts = [sum(1 for _ in iter_samples(s)) for s in shards]      # the dedup stage's index pass
        h, n_read = hashlib.sha256(), 0
        for item in shard_spans(shards, CHUNK, counts):
            for key, img in load_chunk(item):
                h.update(key.encode())
                n_read += 1
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert n_read == n, (n_read, n)

    elif step == "dedup":
        from pas.curate.dedup import dedup

        x = np.load(d / "x.npy")
        keys = pd.read_parquet(d / "keys.parquet")["key"].tolist()
        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        m = dedup(keys, x, LAMBDA_DUP, K_DUP, cfg["seed"], index=cfg["dedup_index"], use_gpu=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra["removed"] = int((~m["kept"]).sum())

    elif step == "dedup_graph":
        from pas.curate.dedup import dedup_from_knn

        sims, ids = np.load(d / "knn_sims.npy"), np.load(d / "knn_ids.npy")
        keys = pd.read_parquet(d / "keys.parquet")["key"].tolist()
        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        m = dedup_from_knn(keys, sims, ids, LAMBDA_DUP, cfg["seed"])
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra["removed"] = int((~m["kept"]).sum())

    elif step == "leakage":
        from pas.curate.leakage import by_component, leakage

        x, xt = np.load(d / "x.npy"), np.load(d / "xt.npy")
        comp, kept = np.load(d / "comp.npy"), np.load(d / "kept.npy")
        keys = pd.read_parquet(d / "keys.parquet")["key"].tolist()
        tkeys = [f"t{i:05d}" for i in range(len(xt))]
        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        checked = leakage(keys, x, tkeys, ["test"] * len(xt), xt, LAMBDA_LEAK, K_LEAK, use_gpu=False)
        m = by_component(checked, comp, kept, "component")
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra["dropped"] = int((~m["kept"]).sum())

    elif step == "ood":
        from pas.curate.ood import three_scores

        bank = np.load(d / "ood_bank.npy")
        rng = np.random.default_rng(cfg["seed"])
        unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
        dim, c = bank.shape[1], cfg["concepts"]
        B = (unit(rng.standard_normal((c, dim))), unit(rng.standard_normal((c, dim))))
        Bp = (unit(rng.standard_normal((N_BPRIME, dim))), unit(rng.standard_normal((N_BPRIME, dim))))
        has_text_all = rng.random(n) < 0.2
        out = {k: np.empty(n) for k in ("ood_b", "ood_bprime", "ood_blur_delta")}
        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        for s in range(0, n, OOD_BATCH):
            e = min(s + OOD_BATCH, n)
            rows = np.arange(s, e) % OOD_BANK                           # cycle through the bank
            has_text = has_text_all[s:e]
            f, f_blur = bank[rows], bank[(rows[has_text] + 1) % OOD_BANK]
            r = three_scores(f, f_blur, has_text, B, Bp, scale=100.0)
            for k in out:
                out[k][s:e] = r[k]
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra["mean_ood_b"] = round(float(out["ood_b"].mean()), 4)

    elif step == "prune":
        from pas.curate.prune import PruneParams, select

        scores = pd.read_parquet(d / "scores.parquet")
        select(scores.head(300), PruneParams())             # numba compile / cache load, untimed
        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        res = select(scores, PruneParams())
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra.update(fronts=res.summary["fronts"], removed=res.summary["n_removed"])

    elif step == "export":
        from pas.curate.export import export_dataset

        table = pd.read_parquet(d / "table.parquet")
        out = d / "dataset"
        rss0, t0, c0 = rss(), time.perf_counter(), time.process_time()
        rep = export_dataset([d / "images"], table, out, maxcount=SHARD_MAX, buffer_bytes=sort_buffer_mb << 20,
                             progress=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        extra.update(kept=len(rep.index), sort_runs=rep.n_runs, sort_buffer_mb=sort_buffer_mb,
                     sha256=tree_sha256(out))
        shutil.rmtree(out)

    else:
        raise SystemExit(f"unknown step {step}")
    # cpu: seconds of every thread of the process, steadier than wall time on a shared machine
    return {"step": step, "n": n, "seconds": round(dt, 3), "cpu_s": round(cpu, 3), "peak_rss_mb": round(rss(), 1),
            "rss_before_mb": round(rss0, 1), **extra}


# --------------------------------------------------------------------------------------- parent

def fit(ns, ys) -> float | None:
    """b of y ∝ N^b, least squares on log-log; None with < 2 sizes or a non-positive y."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if y > 0]
    if len(pts) < 2 or len(pts) != len(ns):
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def child(args_list: list[str], inline: bool = False) -> subprocess.CompletedProcess:
    if not inline:
        return subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args_list)
    return subprocess.CompletedProcess(args_list, 0, out.getvalue(), "")


def table(results: list[dict], skipped: list[str], mem_floor: float) -> str:
    lines = ["| step | N | seconds | CPU s | peak RSS MB | RSS before MB | peak − before MB | load | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    keep = ("step", "n", "seconds", "cpu_s", "peak_rss_mb", "rss_before_mb", "load1")
    for r in results:
        notes = ", ".join(f"{k} {v}" for k, v in r.items() if k not in keep)
        lines.append(f"| {r['step']} | {r['n']:,} | {r['seconds']} | {r.get('cpu_s', '-')} | {r['peak_rss_mb']} | "
                     f"{r['rss_before_mb']} | {r['peak_rss_mb'] - r['rss_before_mb']:.1f} | {r.get('load1', '-')} | "
                     f"{notes} |")
    lines += ["", "| step | sizes | b (wall) | b (CPU) | b (memory above before) | verdict |",
              "|---|---|---|---|---|---|"]
    f2 = lambda b: "-" if b is None else f"{b:.2f}"  # noqa: E731
    for step in dict.fromkeys(r["step"] for r in results):
        rs = sorted((r for r in results if r["step"] == step), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        bt = fit(ns, [r["seconds"] for r in rs])
        bc = fit(ns, [r["cpu_s"] for r in rs]) if all("cpu_s" in r for r in rs) else None
        grow = [r["peak_rss_mb"] - r["rss_before_mb"] for r in rs]
        # growth below the floor at every size is noise (allocator, lazily imported modules)
        bm = fit(ns, grow) if max(grow) >= mem_floor else None
        mem = "flat" if max(grow) < mem_floor else f2(bm)
        # CPU time judges time when it is there: wall time on a loaded machine moves by 2× or more
        flags = [w for w, b in (("time", bc if bc is not None else bt), ("memory", bm))
                 if b is not None and b > SUPER_LINEAR]
        verdict = ("above linear: " + ", ".join(flags)) if flags else ("linear" if bt is not None else "one size")
        lines.append(f"| {step} | {', '.join(f'{n:,}' for n in ns)} | {f2(bt)} | {f2(bc)} | {mem} | {verdict} |")
    lines += [f"- skipped: {s}" for s in skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--root", default="/tmp/pas-scale", help="data per N under ROOT/N (deleted at the end)")
    ap.add_argument("--keep-data", action="store_true", help="leave ROOT in place")
    ap.add_argument("--dim", type=int, default=512, help="SSCD descriptor dim (the released models: 512)")
    ap.add_argument("--dedup-index", default="flat", help="dedup.index (shipped: flat)")
    ap.add_argument("--test", type=int, default=1296, help="eval test images for leakage")
    ap.add_argument("--concepts", type=int, default=1024, help="|B| for ood")
    ap.add_argument("--ood-dim", type=int, default=512, help="CLIP embedding dim (ViT-B: 512, ViT-L: 768)")
    ap.add_argument("--max-seconds", type=float, default=900.0,
                    help="skip a step whose extrapolated time exceeds this")
    ap.add_argument("--mem-floor", type=float, default=20.0,
                    help="MB of growth above 'before' under which memory counts as flat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sort-buffer-mb", type=int, default=1024, help="export's sort buffer (prune.sort_buffer_mb)")
    ap.add_argument("--json", help="write the rows (and skips) to this JSON file")
    ap.add_argument("--inline", action="store_true",
                    help="run data and steps in this process (fast, for tests: RSS then is not per step)")
    ap.add_argument("--from-json", nargs="+", help="print the table of these --json files (merged) and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--make-data", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.root)

    if args.from_json:
        rows, skips = {}, []
        for f in args.from_json:              # a later file's row replaces an earlier one's
            data = json.loads(Path(f).read_text())
            rows.update({(r["step"], r["n"]): r for r in data["rows"]})
            skips += data["skipped"]
        # a skip that a later file ran after all is dropped
        skips = [s for s in dict.fromkeys(skips)
                 if not any(s.startswith(f"{r['step']} at N={r['n']:,}:") for r in rows.values())]
        merged = sorted(rows.values(), key=lambda r: (STEPS.index(r["step"]), r["n"]))
        print(table(merged, skips, args.mem_floor))
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": merged, "skipped": skips}, indent=1) + "\n")
        return 0
    if args.make_data is not None:
        make_data(args.make_data, root / str(args.make_data), args.dim, args.test, args.seed)
        return 0
    if args.one:
        n = args.sizes[0]
        print(json.dumps(run_step(args.one, n, root / str(n), args.sort_buffer_mb)))
        return 0

    print(f"# sizes {args.sizes}, steps {args.steps}; dim {args.dim}, dedup.index {args.dedup_index}, "
          f"{args.test} test images, |B| {args.concepts} × ood dim {args.ood_dim}; {os.cpu_count()} cores, "
          f"load {os.getloadavg()}", flush=True)
    results, skipped = [], []
    common = ["--root", str(root), "--seed", str(args.seed), "--sort-buffer-mb", str(args.sort_buffer_mb)]
    try:
        for n in sorted(args.sizes):
            d = root / str(n)
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps({
                "seed": args.seed, "dedup_index": args.dedup_index, "concepts": args.concepts,
                "ood_dim": args.ood_dim}))
            t0 = time.perf_counter()
            r = child(["--make-data", str(n), "--dim", str(args.dim), "--test", str(args.test), *common],
                      args.inline)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            print(f"# data N={n}: {time.perf_counter() - t0:.1f} s", flush=True)
            steps = list(args.steps)
            if any(s in NEEDS_IMAGES for s in steps) and "shards" not in steps:
                steps.insert(0, "shards")       # the image shards are the shards step's output
            for step in steps:
                prev = [r for r in results if r["step"] == step]
                if step in NEEDS_IMAGES and not (d / "images" / "index.parquet").is_file():
                    skipped.append(f"{step} at N={n:,}: no image shards (the shards step did not run)")
                    print(f"# {skipped[-1]}", flush=True)
                    continue
                # the shards step is never skipped when a later step reads its images
                if prev and not (step == "shards" and any(s in NEEDS_IMAGES for s in steps)):
                    # CPU seconds when every earlier size has them: wall time on a loaded machine
                    # can double between sizes and fake an exponent
                    col = "cpu_s" if all("cpu_s" in p for p in prev) else "seconds"
                    b = max(1.0, fit([p["n"] for p in prev], [p[col] for p in prev]) or 1.0)
                    est = prev[-1]["seconds"] * (n / prev[-1]["n"]) ** b
                    if est > args.max_seconds:
                        skipped.append(f"{step} at N={n:,}: ~{est:.0f} s extrapolated (b {b:.2f}) "
                                       f"> --max-seconds {args.max_seconds:.0f}")
                        print(f"# {skipped[-1]}", flush=True)
                        continue
                r = child(["--one", step, "--sizes", str(n), *common], args.inline)
                if r.returncode:
                    print(f"# {step} N={n} failed:\n{r.stderr[-3000:]}", flush=True)
                    skipped.append(f"{step} at N={n:,}: failed (rc {r.returncode})")
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res["load1"] = round(os.getloadavg()[0], 2)
                if step in args.steps:
                    results.append(res)
                print(json.dumps(res), flush=True)
            if not args.keep_data:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep_data:
            shutil.rmtree(root, ignore_errors=True)
    text = table(results, skipped, args.mem_floor)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results, "skipped": skipped}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
