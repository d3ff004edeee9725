"""retrieve.backend clip_service at scale: kNN batches, URL dedupe, img2dataset downloads, resume, memory.

Real code paths against tests/knn_standin.py (a clip-retrieval /knn-service and misbehaving image URLs
on 127.0.0.1); the downloads run through the real img2dataset."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pas.collect.clip_client import KnnClient, ServiceParams
from pas.collect.knn_service import (failure_reason, group_part, hits_table, part_of, query_batches,
                                     split_parts, write_url_parts)
from pas.collect.retrieve import RetrieveParams, retrieve
from pas.io.manifest import read_parquet, write_parquet
from pas.io.shards import iter_samples, make_key
from tests.helpers import file_digests
from tests.knn_standin import Standin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def service():
    s = Standin(n_urls=40, slow_s=1.5)
    yield s
    s.close()


def params(url, **svc):
    return RetrieveParams(backend="clip_service", k_retrieve=10, shard_size=3, batch_size=2, service={
        "url": url, "retries": 1, "backoff": 0.0, "image_timeout": 0.5, "workers": 4,
        "max_pixels": 200 * 200, "shard_size": 8, **svc})


def res(*rows):
    return [{"url": u, "caption": f"c {u}", "similarity": s, "id": i} for i, (u, s) in enumerate(rows)]


def test_hits_table_keeps_first_k_distinct_urls_per_concept():
    t = hits_table(["a", "b"], [res(("u1", 0.5), ("u2", 0.4), ("u1", 0.3), ("u3", 0.2)), []], k=2).to_pylist()
    assert [(r["concept"], r["rank"], r["url"], r["similarity"]) for r in t] == [("a", 0, "u1", 0.5),
                                                                              ("a", 1, "u2", 0.4)]
    assert t[0]["key"] == make_key("r", "u1") and t[0]["caption"] == "c u1" and t[0]["service_id"] == "0"


def test_group_part_stores_each_url_once_with_its_concepts_best_first():
    hits = pa.concat_tables([hits_table(["pear"], [res(("g", 0.35), ("b", 0.25))], 5),
                             hits_table(["apple"], [res(("r", 0.31), ("g", 0.30))], 5),
                             hits_table(["fig"], [res(("g", 0.35))], 5)])
    table, sorted_hits = group_part(hits)
    rows = {r["url"]: r for r in table.to_pylist()}
    assert table["sample_key"].to_pylist() == sorted(make_key("r", u) for u in "gbr")
    assert rows["g"]["concepts"] == ["fig", "pear", "apple"] and rows["g"]["similarities"] == [0.35, 0.35, 0.30]
    assert rows["g"]["caption"] == "c g" and rows["b"]["concepts"] == ["pear"]
    assert sorted_hits.num_rows == 5
    empty, _ = group_part(hits.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema == table.schema
    forged = hits.set_column(6, "key", pa.array([hits["key"][0].as_py()] * hits.num_rows))
    with pytest.raises(ValueError, match="two URLs share the key"):   # a sha1-prefix collision is loud
        group_part(forged)


def test_key_ranges_are_monotone_and_even():
    keys = sorted(make_key("r", f"http://x/{i}") for i in range(20_000))
    parts = part_of(keys, 8)
    assert (parts[1:] >= parts[:-1]).all()                    # in key order the parts are in order
    counts = pd.Series(parts).value_counts()
    assert len(counts) == 8 and counts.min() > 2_200 and counts.max() < 2_800


@pytest.mark.parametrize("status, error, reason", [
    ("failed_to_download", "HTTP Error 404: Not Found", "not_found"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_error"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "IncompleteRead(50 bytes read, 50 more expected)", "truncated"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opted_out"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "unreachable"),
    ("failed_to_resize", "image area too large", "too_large"),
    ("failed_to_resize", "Image decoding error", "not_an_image"),
    ("failed_to_download", "something else", "download_error"),
])
def test_failure_reasons(status, error, reason):
    assert failure_reason(status, error) == reason


def test_query_batches_resume_and_refetch_on_change(service, tmp_path):
    client = KnnClient(ServiceParams(url=service.url), num_images=5)
    concepts = [f"c{i}" for i in range(5)]
    q, paths = query_batches(concepts, concepts, client, 5, 2, tmp_path / "hits", "fp1", progress=False)
    assert q == {"n_batches": 3, "n_query_batches_resumed": 0, "n_hits": 25} and len(service.queries) == 5
    paths[1].with_suffix(".json").unlink()          # as if killed while writing batch 1's marker
    q, again = query_batches(concepts, concepts, client, 5, 2, tmp_path / "hits", "fp1", progress=False)
    assert q["n_query_batches_resumed"] == 2 and len(service.queries) == 7   # only batch 1 asked again
    assert again == paths and [pq.read_table(p).num_rows for p in paths] == [10, 10, 5]
    q, paths = query_batches(concepts[:2], concepts[:2], client, 5, 2, tmp_path / "hits", "fp2", progress=False)
    assert q["n_query_batches_resumed"] == 0 and sorted(p.name for p in (tmp_path / "hits").iterdir()) == \
        sorted([paths[0].name, paths[0].with_suffix(".json").name])     # new settings: asked again, stale gone


def test_service_retrieval_end_to_end(service, tmp_path, monkeypatch):
    service.table = {
        "a photo of apple.": [("red.jpg", .31), ("green.jpg", .30), ("flaky-1.jpg", .29), ("text-1.jpg", .2),
                              ("missing-1.jpg", .19), ("slow-1.jpg", .18), ("huge-1.jpg", .17),
                              ("trunc-1.jpg", .16), ("optout-1.jpg", .15)],
        "a photo of pear.": [("green.jpg", .35), ("blue.jpg", .25), ("green.jpg", .2)],
        "a photo of kiwi.": [],
    }
    out, cache = tmp_path / "retrieved", tmp_path / "cache"
    m = retrieve(["apple", "pear", "kiwi"], out, params(service.url), cache_dir=cache, progress=False)
    assert {k: v for k, v in m.items() if k.startswith("dropped_")} == {
        "dropped_not_found": 1, "dropped_timeout": 1, "dropped_not_an_image": 1, "dropped_too_large": 1,
        "dropped_truncated": 1, "dropped_opted_out": 1}
    assert (m["n_hits"], m["n_urls"], m["n_downloaded"], m["n_unique"], m["n_images"]) == (11, 10, 4, 4, 5)
    assert m["concepts_zero_hits"] == 1 and m["n_query_batches_resumed"] == 0
    assert service.gets["green.jpg"] == 1 and service.gets["flaky-1.jpg"] == 2   # once; 500 then retried
    samples = {s.key: s for s in iter_samples(out)}
    idx = read_parquet(out / "index.parquet")
    assert list(idx["key"]) == sorted(samples) == list(samples)        # shards and index in key order
    green = samples[make_key("r", f"{service.base}/img/green.jpg")]
    assert set(green.meta) == {"key", "source", "concepts", "similarities", "pool_key", "url", "caption",
                               "service_id"}
    assert green.meta["concepts"] == ["pear", "apple"] and green.meta["similarities"] == [0.35, 0.30]
    assert (green.meta["source"], green.meta["pool_key"], green.ext) == ("real", None, "jpg")
    assert green.meta["url"] == f"{service.base}/img/green.jpg" and green.meta["caption"] == "a caption of green.jpg"
    row = idx.set_index("key").loc[green.key]
    assert (row.url, row.caption, row.concept, list(row.concepts)) == (green.meta["url"], green.meta["caption"],
                                                                       "pear", ["pear", "apple"])
    assert green.pil().getpixel((4, 4)) == pytest.approx(tuple(hashlib.sha1(b"green.jpg").digest()[:3]), abs=8)
    assert all(n <= 3 for n in pd.Series([s.shard for s in samples.values()]).value_counts())
    hits = read_parquet(out / "hits.parquet")
    assert sorted(zip(hits.concept, hits.key)) == sorted((c, k) for k, s in samples.items() for c in s.meta["concepts"])
    assert list(iter_samples(out))                              # shards pass their index's sha256 check

    # a rerun finds every batch and shard done: no request, same bytes
    before, n_queries, gets = file_digests(out), len(service.queries), sum(service.gets.values())
    m2 = retrieve(["apple", "pear", "kiwi"], out, params(service.url), cache_dir=cache, progress=False)
    assert file_digests(out) == before and len(service.queries) == n_queries and sum(service.gets.values()) == gets
    assert m2["n_query_batches_resumed"] == 2 and m2["n_download_shards_resumed"] == m2["n_download_shards"]
    assert {k: v for k, v in m2.items() if not k.startswith(("seconds", "n_query", "n_download_shards_r"))} == \
        {k: v for k, v in m.items() if not k.startswith(("seconds", "n_query", "n_download_shards_r"))}
    # another max_side is another download: the old shards are dropped before it, not mixed in
    import pas.collect.knn_service as ks

    def no_download(urls_dir, dl_dir, sp):
        assert sp.max_side == 4 and not dl_dir.exists()
        raise KeyboardInterrupt
    monkeypatch.setattr(ks, "download", no_download)
    with pytest.raises(KeyboardInterrupt):
        retrieve(["apple", "pear", "kiwi"], out, params(service.url, max_side=4), cache_dir=cache, progress=False)


def test_query_and_dedupe_memory_is_independent_of_the_hits(tmp_path):
    """≥ 50k hits through steps 1–2 (query, split, group): the traced peak stays that of one batch
    and one part, not of all the hits (holding 60k hits' results would take ~10× the small run's)."""
    s = Standin(n_urls=100_000)
    try:
        def peak(n_concepts: int, d: Path) -> tuple[int, int]:
            client = KnnClient(ServiceParams(url=s.url, query_workers=4), num_images=500)
            concepts = [f"concept {i}" for i in range(n_concepts)]
            tracemalloc.start()
            q, batches = query_batches(concepts, concepts, client, 500, 12, d / "hits", "fp", progress=False)
            parts = split_parts(batches, d / "parts", max(1, q["n_hits"] // 6_000))
            urls = write_url_parts(parts, d / "urls")
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            client.close()
            return q["n_hits"], top, sum(n for _, n in urls)

        n_small, small, _ = peak(12, tmp_path / "small")
        n_large, large, n_urls = peak(120, tmp_path / "large")
    finally:
        s.close()
    assert (n_small, n_large) == (6_000, 60_000) and 40_000 < n_urls < 60_000
    assert large < 2 * small, (small, large)


@pytest.mark.slow
def test_sigkill_resumes_without_downloading_finished_shards(service, tmp_path):
    """The stage killed (SIGKILL to its process group: it and img2dataset's workers) after a download
    shard finished; the rerun completes and fetches no URL of a finished shard again."""
    service.table = {f"a photo of c{i}.": [(f"slow-{i}-{j}.jpg", 0.3 - j / 100) for j in range(4)]
                     for i in range(3)}
    service.slow_s = 0.3
    write_parquet(pd.DataFrame({"concept": [f"c{i}" for i in range(3)], "accepted": True}), tmp_path / "bank.parquet")
    cfg = {"k_retrieve": 4, "retrieve": {"backend": "clip_service", "batch_size": 2, "service": {
        "url": service.url, "retries": 0, "image_timeout": 5.0, "workers": 1, "shard_size": 4}}}
    (tmp_path / "params.yaml").write_text(json.dumps(cfg))
    cache, out = tmp_path / "cache", tmp_path / "retrieved"
    argv = [sys.executable, str(ROOT / "stages" / "retrieve.py"), "--concepts", str(tmp_path / "bank.parquet"),
            "--out", str(out), "--cache", str(cache), "--metrics", str(tmp_path / "m.json"),
            "--params", str(tmp_path / "params.yaml")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list((cache / "download").glob("*_stats.json")) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted((cache / "download").glob("*_stats.json"))
    assert done and len(done) < 3
    finished = {u.rsplit("/", 1)[-1] for f in done
                for u in pq.read_table(str(f).replace("_stats.json", ".parquet"))["url"].to_pylist()}
    assert len(finished) == 4 * len(done)
    tars = {f: Path(str(f).replace("_stats.json", ".tar")).read_bytes() for f in done}
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert all(service.gets[name] == 1 for name in finished)          # not downloaded again
    assert all(Path(str(f).replace("_stats.json", ".tar")).read_bytes() == b for f, b in tars.items())
    assert sum(1 for _ in iter_samples(out)) == 12
    m = json.loads((tmp_path / "m.run.json").read_text())
    assert m["n_download_shards_resumed"] == len(done) and m["n_query_batches_resumed"] == 2


def test_unfinished_download_is_an_error_not_a_smaller_set(service, tmp_path, monkeypatch):
    """img2dataset ending with shards missing (a shard failed past max_shard_retry, or Ctrl-C, which
    it turns into exit 0) fails the stage with exit 1 and writes no data/retrieved."""
    import pas.collect.knn_service as ks
    from pas.collect.knn_service import DownloadError
    from tests.stage_helpers import load_stage

    monkeypatch.setattr(ks, "download", lambda urls_dir, dl_dir, sp: None)
    service.table = {"a photo of fig.": [("red.jpg", 0.3)]}
    with pytest.raises(DownloadError, match="finished 0 of 1 download shards.*rerun to resume"):
        retrieve(["fig"], tmp_path / "out", params(service.url), cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "out").exists()
    write_parquet(pd.DataFrame({"concept": ["fig"], "accepted": True}), tmp_path / "bank.parquet")
    (tmp_path / "params.yaml").write_text(json.dumps({"retrieve": {"backend": "clip_service",
                                                                   "service": {"url": service.url}}}))
    stage = load_stage("retrieve")
    assert stage.main(["--concepts", str(tmp_path / "bank.parquet"), "--out", str(tmp_path / "out"),
                       "--cache", str(tmp_path / "cache"), "--metrics", str(tmp_path / "m.json"),
                       "--params", str(tmp_path / "params.yaml")]) == 1
    assert not (tmp_path / "m.json").exists()
