"""Memory of retrieve.backend clip_service at LAION scale (issue 17): RSS at 10 %, 50 %, 100 % of a run.

The kNN service and the image web are tests/knn_standin.py in their own process (tiny 8×8 JPEGs).
The measured run is a child process; a sampler here reads its memory every 0.2 s (psutil: the pas
process's RSS, and RSS and PSS summed with its children, img2dataset's download and logger processes)
and notes it when 10 %, 50 % and 100 % of the query batches (`hits/*.json`, the store's done markers) and of the download
shards (`download/*_stats.json`) are done, and the peak of each phase (query; dedupe + download;
write).

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

from _common import emit

ROOT = Path(__file__).resolve().parents[1]


def tree_mem(p) -> tuple[int, int, int]:
    """(RSS of the pas process, RSS summed over it and its children, PSS summed likewise). The RSS sum
    counts the shared pages of libraries (torch, imported by webdataset in each img2dataset process)
    once per process; PSS splits them among the processes that share them."""
    import psutil

    own = rss = pss = 0
    for q in [p] + p.children(recursive=True):
        try:
            m = q.memory_full_info()
        except psutil.Error:
            continue
        own = own or m.rss
        rss += m.rss
        pss += m.pss
    return own, rss, pss


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
            marks: dict[str, tuple] = {}
            # phases: query (step 1), dedupe (step 2) + download (step 3, full mode), write (step 4)
            peak: dict[str, list] = {ph: [0, 0, 0] for ph in ("query", "dedupe_download", "write")}
            cache = Path(work) / "cache"
            stop = threading.Event()
            n_dl: list[int] = []

            def count(d: str, pattern: str) -> int:
                return len(list((cache / d).glob(pattern))) if (cache / d).exists() else 0

            def sample() -> None:
                while not stop.is_set():
                    mem = tree_mem(p)
                    q_done = count("hits", "[!.]*.json")
                    if not n_dl and (cache / "download.json").exists():
                        import pyarrow.parquet as pq
                        n_dl.append(sum(-(-pq.ParquetFile(u).metadata.num_rows // 10_000)
                                        for u in sorted((cache / "urls").glob("*.parquet"))))
                    d_done = count("download", "*_stats.json")
                    phase = "query" if q_done < n_batches else "dedupe_download" if not n_dl or d_done < n_dl[0] \
                        else "write"
                    peak[phase] = [max(a, b) for a, b in zip(peak[phase], mem)]
                    for f in (0.1, 0.5, 1.0):
                        if q_done >= f * n_batches:
                            marks.setdefault(f"query_{f:.0%}", mem)
                        if n_dl and d_done >= f * n_dl[0]:
                            marks.setdefault(f"download_{f:.0%}", mem)
                    stop.wait(0.2)

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
    line = {"mode": args.mode, "concepts": args.concepts, "k": args.k, **res}
    for k, (own, rss, pss) in [*marks.items(), *((f"peak_{ph}", v) for ph, v in peak.items() if v[0])]:
        line[k] = {"pas_rss_mb": mb(own), "tree_rss_mb": mb(rss), "tree_pss_mb": mb(pss)}
    emit(line, args.json, append=True, indent=None)


if __name__ == "__main__":
    main()
