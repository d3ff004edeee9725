"""Memory of retrieve.backend clip_service at LAION scale (issue 17): RSS at 10 %, 50 %, 100 % of a run.

The kNN service and the image web are tests/knn_standin.py in their own process (tiny 8×8 JPEGs).
The measured run is a child process; a sampler here reads its RSS (psutil, summed with its children:
img2dataset's download and logger processes) every 0.1 s and notes it when 10 %, 50 % and 100 % of the
query batches (`hits/*.done.json`) and of the download shards (`download/*_stats.json`) are done.

    python benchmarks/retrieve_scale.py --mode query --concepts 5000      # steps 1-2 at 5k × 500
    python benchmarks/retrieve_scale.py --mode full --concepts 400        # + img2dataset + shards

`--mode query` runs query + dedupe (pas.collect.knn_service steps 1-2); `--mode full` the whole backend.
Prints one JSON line per run (appended to --json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(p) -> int:
    import psutil

    total = 0
    for q in [p] + p.children(recursive=True):
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def worker(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from pas.collect.clip_client import KnnClient, ServiceParams
    from pas.collect.knn_service import query_batches, split_parts, write_url_parts
    from pas.collect.retrieve import RetrieveParams, retrieve

    base = Path(args.base_file).read_text()
    concepts = [f"concept {i}" for i in range(args.concepts)]
    cache, t0 = Path(args.work) / "cache", time.perf_counter()
    svc = {"url": base + "/knn-service", "query_workers": 8, "workers": 32, "processes": 2,
           "shard_size": 10_000, "retries": 0, "image_timeout": 20.0}
    if args.mode == "query":
        client = KnnClient(ServiceParams(**svc), num_images=args.k)
        q = query_batches(concepts, concepts, client, args.k, 256, cache / "hits", "bench", progress=False)
        parts = split_parts(cache / "hits", q["n_batches"], cache / "parts", max(1, -(-q["n_hits"] // 200_000)))
        urls = write_url_parts(parts, cache / "urls")
        out = {"n_hits": q["n_hits"], "n_urls": sum(n for _, n in urls)}
    else:
        p = RetrieveParams(backend="clip_service", k_retrieve=args.k, batch_size=256, service=svc)
        m = retrieve(concepts, Path(args.work) / "retrieved", p, cache_dir=cache, progress=False)
        out = {k: m[k] for k in ("n_hits", "n_urls", "n_downloaded", "n_unique", "n_download_shards")}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.work, "result.json").write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("query", "full"), default="query")
    ap.add_argument("--concepts", type=int, default=5000)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--n-urls", type=int, default=2_000_000, help="distinct URLs the stand-in draws from")
    ap.add_argument("--json", help="append the result line here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--base-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import psutil

    with tempfile.TemporaryDirectory(prefix="retrieve-scale-") as work:
        base_file = Path(work) / "base"
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "knn_standin.py"), "--port-file",
                                   str(base_file), "--n-urls", str(args.n_urls)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            while not base_file.exists():
                time.sleep(0.1)
            n_batches = -(-args.concepts // 256)
            child = subprocess.Popen([sys.executable, __file__, "--worker", "--mode", args.mode, "--concepts",
                                      str(args.concepts), "--k", str(args.k), "--work", work,
                                      "--base-file", str(base_file)], stdout=subprocess.DEVNULL)
            p = psutil.Process(child.pid)
            marks: dict[str, int] = {}
            peak = {"query": 0, "rest": 0}
            cache = Path(work) / "cache"
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    rss = tree_rss(p)
                    q_done = len(list((cache / "hits").glob("*.done.json"))) if (cache / "hits").exists() else 0
                    phase = "query" if q_done < n_batches else "rest"
                    peak[phase] = max(peak[phase], rss)
                    for f in (0.1, 0.5, 1.0):
                        if q_done >= f * n_batches and f"query_{f:.0%}" not in marks:
                            marks[f"query_{f:.0%}"] = rss
                    stats = list((cache / "download").glob("*_stats.json")) if (cache / "download").exists() else []
                    urls = list((cache / "urls").glob("*.parquet")) if (cache / "urls").exists() else []
                    if urls and "n_dl_shards" not in marks:
                        import pyarrow.parquet as pq
                        try:
                            marks["n_dl_shards"] = sum(-(-pq.ParquetFile(u).metadata.num_rows // 10_000)
                                                       for u in urls)
                        except Exception:   # noqa: BLE001 — a part still being written
                            pass
                    n = marks.get("n_dl_shards")
                    for f in (0.1, 0.5, 1.0):
                        if n and len(stats) >= f * n and f"download_{f:.0%}" not in marks:
                            marks[f"download_{f:.0%}"] = rss
                    stop.wait(0.1)

            t = threading.Thread(target=sample, daemon=True)
            t.start()
            child.wait()
            stop.set()
            t.join()
            if child.returncode:
                raise SystemExit(f"worker failed with {child.returncode}")
            res = json.loads(Path(work, "result.json").read_text())
        finally:
            server.terminate()
            server.wait()
    mb = lambda b: round(b / 2**20)   # noqa: E731
    line = {"mode": args.mode, "concepts": args.concepts, "k": args.k, **res,
            **{f"rss_mb_{k}": mb(v) for k, v in marks.items() if k != "n_dl_shards"},
            "rss_mb_peak_query": mb(peak["query"]), "rss_mb_peak_after_query": mb(peak["rest"])}
    print(json.dumps(line))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
