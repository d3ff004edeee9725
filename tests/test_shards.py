import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pas.io.manifest import read_metrics, run_path, write_metrics
from pas.io.shards import IMAGE_EXTS, ShardWriter, encode_image, iter_samples, make_key
from tests.helpers import read_run


def _write(out, n, maxcount=3):
    img = encode_image(Image.new("RGB", (8, 8), (1, 2, 3)), "png")  # lossless, to compare pixels
    with ShardWriter(out, maxcount=maxcount) as w:
        for i in range(n):
            w.write(make_key("x", i), img, {"i": i, "text": "ünïcode ✓"}, ext="png")
    return w


def test_shards_roundtrip_and_split(tmp_path):
    w = _write(tmp_path / "a", 7)
    assert w.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    got = list(iter_samples(tmp_path / "a"))
    assert [s.meta["i"] for s in got] == list(range(7))
    assert got[0].meta["key"] == got[0].key and got[0].meta["text"] == "ünïcode ✓"
    assert got[0].pil().getpixel((0, 0)) == (1, 2, 3)
    assert [r["shard"] for r in w.rows] == [s.shard for s in got]


def test_shards_are_byte_reproducible(tmp_path):
    _write(tmp_path / "a", 4)
    _write(tmp_path / "b", 4)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as t:
        assert {m.mtime for m in t.getmembers()} == {0}


@pytest.mark.parametrize("bad", ["../etc/passwd", "a.b", "a/b", "", "ключ", "x" * 200, "x" * 96])
def test_unsafe_keys_refused(tmp_path, bad):
    with ShardWriter(tmp_path) as w, pytest.raises(ValueError, match="unsafe sample key"):
        w.write(bad, b"", {})


def test_longest_key_fits_the_tar_header_with_every_extension(tmp_path):
    """A key KEY_RE accepts is always writable: the refusal comes from the key check, never from tarfile."""
    key = "k" * 95
    with ShardWriter(tmp_path) as w:
        for ext in IMAGE_EXTS:
            w.write(f"{key[:-len(ext)]}{ext}", b"x", {}, ext=ext)
    names = {m.name for m in tarfile.open(tmp_path / "shard-000000.tar").getmembers()}
    assert max(len(n) for n in names) == 100 and len(names) == 6


def test_duplicate_key_refused(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write("k1", b"x", {})
        with pytest.raises(ValueError, match="duplicate"):
            w.write("k1", b"x", {})


def test_make_key_hostile_text_is_safe():
    for text in ["../../x", 'quo"te', "emoji 🍕", "x" * 1000, "a\x00b"]:
        k = make_key("c", text)
        assert k.startswith("c") and len(k) == 17
    assert make_key("c", "a", "b") != make_key("c", "ab")


def test_metrics_are_stable(tmp_path):
    import numpy as np
    write_metrics(tmp_path / "m.json", {"b": np.float32(0.1234567891), "a": np.int64(3), "c": float("nan")})
    assert read_metrics(tmp_path / "m.json") == {"a": 3, "b": 0.123457, "c": None}
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a": 3')


def test_run_dependent_entries_go_to_the_untracked_run_log(tmp_path):
    m = tmp_path / "m.json"

    def run(secs: float, resumed: int) -> bytes:
        write_metrics(m, {"n_out": 5, "seconds": secs, "images_per_second": 5 / secs, "fingerprint": "ab12",
                          "n_shards_resumed": resumed, "n_drawn": 3 - resumed, "captions_cached": bool(resumed),
                          "by_set": {"food": {"top1": 0.5, "seconds_per_image": secs / 5}}}, run_keys=("n_drawn",))
        return m.read_bytes()

    first = run(2.0, 0)
    assert read_metrics(m) == {"n_out": 5, "by_set": {"food": {"top1": 0.5}}}
    assert read_run(m) == {"seconds": 2.0, "images_per_second": 2.5, "fingerprint": "ab12", "n_shards_resumed": 0,
                           "n_drawn": 3, "captions_cached": False, "by_set": {"food": {"seconds_per_image": 0.4}}}
    assert run_path(m) == tmp_path / "m.run.json"
    assert run(7.5, 3) == first                      # a slower, resumed rerun: the same tracked bytes
    assert read_run(m)["n_shards_resumed"] == 3
    write_metrics(m, {"n_out": 5})                   # nothing run-dependent: no stale run log survives
    assert read_run(m) == {} and not run_path(m).exists()


def test_run_logs_are_git_ignored():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    for f in ("metrics/pool.run.json", "metrics/models/clip.run.json"):
        assert subprocess.run(["git", "check-ignore", "-q", f], cwd=root).returncode == 0, f
    assert subprocess.run(["git", "check-ignore", "-q", "metrics/pool.json"], cwd=root).returncode == 1


def _mixed_shard(path, n):
    """A tar of `n` samples as other writers may store them: jpg and png, json before the image every
    5th sample, a stray text member and a directory entry."""
    from pas.io.shards import _add

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(_dir("sub"))
        for i in range(n):
            ext = "png" if i % 2 else "jpg"
            img = encode_image(Image.new("RGB", (4 + i % 3, 4), (i, 0, 0)), ext)
            meta = json.dumps({"key": f"k{i}", "i": i}).encode()
            parts = [(f"k{i}.{ext}", img), (f"sub/k{i}.json", meta)]
            if i % 5 == 0:
                parts = [parts[1], (f"k{i}.txt", b"caption"), parts[0]]
            for name, data in parts:
                _add(tar, name, data)
    return path


def _dir(name):
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    return ti


def _as_tuples(samples):
    return [(s.key, s.ext, s.image, s.meta, s.shard) for s in samples]


def test_chunked_reads_equal_plain_iteration(tmp_path):
    from pas.data.chunks import load_chunk, plan_chunks
    from pas.io.shards import read_samples

    (tmp_path / "d").mkdir()
    shard = _mixed_shard(tmp_path / "d" / "x.tar", 23)
    want = _as_tuples(iter_samples(shard))
    assert [t[0] for t in want] == [f"k{i}" for i in range(23)]
    for start, stop in [(0, 23), (0, 1), (7, 12), (22, 23), (5, 5), (20, 99)]:
        assert _as_tuples(read_samples(shard, start, stop)) == want[start:stop]
    for chunk in (1, 4, 23, 100):
        got = [(k, im.tobytes()) for it in plan_chunks(tmp_path / "d", chunk) for k, im in load_chunk(it)]
        assert got == [(s.key, s.pil().tobytes()) for s in iter_samples(shard)]


def test_chunked_reading_touches_each_member_once(tmp_path, monkeypatch):
    """Reading an N-sample shard in chunks parses each tar header and decodes each sample's json once
    in total (it used to re-read the shard from its start for every chunk: O(N²/chunk))."""
    import pas.io.shards as shards
    from pas.data.chunks import load_chunk, plan_chunks

    n = 60
    with ShardWriter(tmp_path, maxcount=n) as w:
        for i in range(n):
            w.write(f"k{i:03d}", encode_image(Image.new("RGB", (4, 4), (i, 0, 0))), {"i": i})
    headers, metas, reads = [0], [0], []
    frombuf = tarfile.TarInfo.frombuf.__func__

    def counting_frombuf(cls, *a, **kw):
        headers[0] += 1
        return frombuf(cls, *a, **kw)

    class CountingJson:
        def loads(self, *a, **kw):
            metas[0] += 1
            return json.loads(*a, **kw)

    read_at = getattr(shards, "_read_at", None)
    monkeypatch.setattr(tarfile.TarInfo, "frombuf", classmethod(counting_frombuf))
    monkeypatch.setattr(shards, "json", CountingJson())
    monkeypatch.setattr(shards, "_read_at", lambda f, off, size, shard: reads.append(off) or read_at(f, off, size, shard),
                        raising=False)
    shards._table.cache_clear()             # a fresh process: no header scan cached yet
    keys = [k for it in plan_chunks(tmp_path, 7) for k, _ in load_chunk(it)]
    assert keys == [f"k{i:03d}" for i in range(n)]
    assert metas[0] == n
    assert headers[0] <= 2 * n + 2          # one header scan: 2 members per sample (+ end blocks)
    assert len(reads) == 2 * n == len(set(reads))


def _indexed(d, n=5, digests=True):
    """`n` samples in one shard + index.parquet (with shard_sha256 when `digests`, else the bare
    key/shard rows older stages wrote)."""
    import pandas as pd

    from pas.io.shards import write_index

    with ShardWriter(d, maxcount=n) as w:
        for i in range(n):
            w.write(f"k{i}", encode_image(Image.new("RGB", (8, 8), (i, 9, 9))), {"i": i})
    if digests:
        write_index(pd.DataFrame(w.rows), d)
    else:
        pd.DataFrame(w.rows).to_parquet(d / "index.parquet")
    return d / "shard-000000.tar"


def _new_process():
    """Forget what this process hashed and scanned: the file-version keys have a few ms of mtime
    granularity, and a stage reads shards in another process than the one that wrote them anyway."""
    import pas.io.shards as shards

    for f in (shards._sha256, shards._expected, shards._table):
        f.cache_clear()


def _read_all_ways(d):
    from pas.data.chunks import load_chunk, plan_chunks

    _new_process()

    yield lambda: list(iter_samples(d))
    yield lambda: list(iter_samples(d / "shard-000000.tar"))
    yield lambda: [k for it in plan_chunks(d, 2) for k, _ in load_chunk(it)]


@pytest.mark.parametrize("digests", [True, False])
def test_shard_cut_at_member_boundary_is_refused(tmp_path, digests):
    """A tar cut exactly before a sample's first header reads as a shorter valid tar; the index says
    how many samples it holds, so every reader refuses it, naming the shard."""
    from pas.io.shards import ShardError

    shard = _indexed(tmp_path, digests=digests)
    assert [s.key for s in iter_samples(tmp_path)] == [f"k{i}" for i in range(5)]
    with tarfile.open(shard) as t:
        cut = t.getmembers()[6].offset          # header of k3.jpg
    with open(shard, "r+b") as f:
        f.truncate(cut)
    with tarfile.open(shard) as t:              # tarfile itself sees nothing wrong
        assert len(t.getmembers()) == 6
    for read in _read_all_ways(tmp_path):
        with pytest.raises(ShardError, match=f"{shard}: .*(sha256|3 samples but .* lists 5)"):
            read()


def test_shard_corrupted_in_place_is_refused(tmp_path):
    from pas.io.shards import ShardError, read_samples

    shard = _indexed(tmp_path)
    size = shard.stat().st_size
    with tarfile.open(shard) as t:
        off = t.getmember("k2.jpg").offset_data + 40
    data = bytearray(shard.read_bytes())
    data[off] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size
    for read in [*_read_all_ways(tmp_path), lambda: list(read_samples(shard, 0, 1))]:
        with pytest.raises(ShardError, match=f"{shard}: sha256 differs from .*index.parquet"):
            read()


def test_index_and_shards_must_agree(tmp_path):
    from pas.io.shards import ShardError

    shard = _indexed(tmp_path)
    extra = tmp_path / "shard-000001.tar"
    extra.write_bytes(shard.read_bytes())
    with pytest.raises(ShardError, match=f"{extra}: shard not listed in"):
        list(iter_samples(tmp_path))
    extra.unlink()
    shard.unlink()
    from pas.data.chunks import plan_chunks

    for read in (lambda: list(iter_samples(tmp_path)), lambda: plan_chunks(tmp_path, 2)):
        with pytest.raises(ShardError, match=f"{shard}: shard listed in .* is missing"):
            read()


def test_read_errors_name_the_shard(tmp_path):
    """Without an index: a tar cut inside a member fails on every reader with the shard's path."""
    from pas.io.shards import ShardError, read_samples

    shard = _indexed(tmp_path)
    (tmp_path / "index.parquet").unlink()
    with tarfile.open(shard) as t:
        cut = t.getmember("k3.jpg").offset_data + 10
    with open(shard, "r+b") as f:
        f.truncate(cut)
    for read in [*_read_all_ways(tmp_path), lambda: list(read_samples(shard, 3, 4))]:
        with pytest.raises(ShardError, match=f"{shard}: (unreadable|truncated) shard"):
            read()


def test_write_index_stores_each_shards_sha256(tmp_path):
    import hashlib

    import pandas as pd

    from pas.io.manifest import read_parquet
    from pas.io.shards import write_index

    w = _write(tmp_path, 5, maxcount=2)
    write_index(pd.DataFrame(w.rows).iloc[::-1], tmp_path)
    idx = read_parquet(tmp_path / "index.parquet")
    assert list(idx["key"]) == sorted(r["key"] for r in w.rows)
    assert list(idx["shard_sha256"]) == [hashlib.sha256((tmp_path / s).read_bytes()).hexdigest() for s in idx["shard"]]
    assert len(list(iter_samples(tmp_path))) == 5


def test_indexed_shard_writer_streams_the_index(tmp_path):
    """Same shards as ShardWriter; index.parquet written shard by shard equals write_index's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pandas as pd

    from pas.io.manifest import read_parquet
    from pas.io.shards import IndexedShardWriter, read_samples_by_key, write_index

    img = encode_image(Image.new("RGB", (8, 8), (1, 2, 3)), "png")
    keys = sorted(make_key("x", i) for i in range(7))
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("i", pa.int64())])
    with IndexedShardWriter(tmp_path / "a", schema, maxcount=3) as w:
        for i, k in enumerate(keys):
            w.write(k, img, {"i": i}, ext="png", row={"i": i})
    with ShardWriter(tmp_path / "b", maxcount=3) as ref:
        for i, k in enumerate(keys):
            ref.write(k, img, {"i": i}, ext="png")
    for name in ref.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_index(pd.DataFrame([{**r, "i": i} for i, r in enumerate(ref.rows)]), tmp_path / "b")
    pd.testing.assert_frame_equal(read_parquet(tmp_path / "a" / "index.parquet"),
                                  read_parquet(tmp_path / "b" / "index.parquet"))
    assert pq.ParquetFile(tmp_path / "a" / "index.parquet").num_row_groups == 3   # one per shard
    assert len(list(iter_samples(tmp_path / "a"))) == 7                            # passes the sha check
    got = [s.meta["i"] for s in read_samples_by_key(tmp_path / "a" / ref.shards[0], keys[:3][::-1])]
    assert got == [2, 1, 0]
    with pytest.raises(ValueError, match="keys must increase"), \
            IndexedShardWriter(tmp_path / "c", schema) as w:
        w.write(keys[1], img, {}, row={"i": 0})
        w.write(keys[0], img, {}, row={"i": 1})
    assert not (tmp_path / "c" / "index.parquet").exists()                     # no index for a half set


def test_selection_stats_vocabulary():
    from pas.io.manifest import row_stats, selection_stats

    # 5 rows: r1 kept, r2 duplicate, s1 kept, s2 duplicate, s3 leak
    s = row_stats(["real", "real", "synthetic", "synthetic", "synthetic"], [1, 0, 1, 0, 0],
                  ["", "duplicate", "", "duplicate", "leak"])
    assert s == {"n_in": 5, "n_kept": 2, "dropped": {"duplicate": 2, "leak": 1},
                 "by_source": {"real": {"n_in": 2, "n_kept": 1}, "synthetic": {"n_in": 3, "n_kept": 1}}}
    # counts given directly (prune: takedown is counted at export, not per row); other sources kept
    s = selection_stats({"real": 4, "web": 1}, {"real": 2}, {"pareto": 2, "takedown": 1, "other": 0})
    assert s["dropped"] == {"pareto": 2, "takedown": 1} and s["by_source"]["synthetic"] == {"n_in": 0, "n_kept": 0}
    assert list(s["by_source"]) == ["real", "synthetic", "web"]
    with pytest.raises(ValueError, match="does not add up"):
        selection_stats({"real": 4}, {"real": 2}, {"pareto": 1})


def test_expected_shards_counts_in_row_batches(tmp_path, monkeypatch):
    import pandas as pd

    import pas.io.shards as sh

    img = encode_image(Image.new("RGB", (4, 4), (9, 9, 9)))
    with ShardWriter(tmp_path, prefix="s", maxcount=3) as w:
        for i in range(11):                      # shards of 3, 3, 3, 2 samples
            w.write(f"k{i:03d}", img, {"i": i})
    sh.write_index(pd.DataFrame(w.rows), tmp_path)
    monkeypatch.setattr(sh, "INDEX_BATCH", 2)    # batches that cut shards in the middle
    sh._expected.cache_clear()
    got = sh.expected_shards(tmp_path)
    want = {name: (n, sh.shard_sha256(tmp_path / name)) for name, n in
            zip(w.shards, (3, 3, 3, 2))}
    assert got == want and list(got) == w.shards
    assert sum(1 for _ in iter_samples(tmp_path)) == 11   # readers still check against it


def test_writer_columns_give_the_index_a_dict_per_row_gave(tmp_path):
    """ShardWriter keeps keys + shard numbers, not a dict per sample: its index table, the `rows`
    view and the dicts it used to collect write the same index.parquet bytes, and writing with
    pre-encoded JSON (`write_encoded` + `meta_json`) gives the same shard bytes as `write`."""
    import hashlib

    import pandas as pd

    from pas.io.shards import meta_json, write_index

    img = encode_image(Image.new("RGB", (8, 8), (4, 5, 6)), "jpg")
    metas = [{"i": i, "text": "ünïcode ✓", "key": "ignored"} for i in range(11)]
    keys = [make_key("y", i) for i in range(11)]
    with ShardWriter(tmp_path / "a", maxcount=4) as a, ShardWriter(tmp_path / "b", maxcount=4) as b:
        for k, m in zip(keys, metas):
            a.write(k, img, m)
            b.write_encoded(k, img, meta_json(k, m))
    old_rows = [{"key": k, "shard": f"shard-{i // 4:06d}.tar"} for i, k in enumerate(keys)]
    assert a.rows == old_rows and a.keys == keys
    digests = set()
    for name, table in (("rows", pd.DataFrame(a.rows)), ("frame", a.index_frame()),
                        ("old", pd.DataFrame(old_rows))):
        write_index(table, tmp_path / "a")
        digests.add(hashlib.sha256((tmp_path / "a" / "index.parquet").read_bytes()).hexdigest())
    assert len(digests) == 1
    for s in a.shards:
        assert (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes()
    assert [x.meta for x in iter_samples(tmp_path / "a")] == [{**m, "key": k} for k, m in zip(keys, metas)]
    with pytest.raises(ValueError, match="duplicate sample key"):
        a.write(keys[3], img, {})
    assert ShardWriter(tmp_path / "c").index_frame().empty


def test_writer_bookkeeping_per_sample_is_small(tmp_path):
    """What the writer holds per written sample once its shards are closed, the keys included (they
    are made here and dropped): their bytes, offsets, hashes, the duplicate check's table and the
    shard numbers, ~73 B at 20k. A list of the key strings and a set of them held ~189 B. (An open
    shard's tarfile keeps a TarInfo per member until it closes: ≤ maxcount.)"""
    import tracemalloc

    n = 20_000
    tracemalloc.start()
    with ShardWriter(tmp_path / "a", maxcount=5_000) as w:
        for i in range(n):
            w.write(make_key("z", i), b"", {})
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert w.n_samples == n and w.keys == [make_key("z", i) for i in range(n)]
    assert held / n < 100, f"{held / n:.0f} bytes per sample"


def test_writer_duplicate_check_is_exact_under_hash_collisions(tmp_path, monkeypatch):
    """The duplicate check finds keys by hash and confirms on the stored bytes: with every key
    hashing alike, distinct keys are all accepted and a repeated one refused; with real hashes, the
    same across the table's growth (a repeat of any earlier key, none accepted twice)."""
    import random

    from pas.io import shards as sh

    img = encode_image(Image.new("RGB", (8, 8)), "jpg")
    rnd = random.Random(0)
    for name, n_keys, n_writes in (("real", 3_000, 6_000), ("collide", 150, 300)):
        if name == "collide":
            monkeypatch.setattr(sh._KeyColumn, "hash", staticmethod(lambda key: -7))
        seen: list[str] = []
        with ShardWriter(tmp_path / name, maxcount=1_000) as w:
            for _ in range(n_writes):
                key = f"k{rnd.randrange(n_keys)}"
                if key in seen:
                    with pytest.raises(ValueError, match=f"duplicate sample key '{key}'"):
                        w.write(key, img, {})
                else:
                    w.write(key, img, {})
                    seen.append(key)
        assert w.keys == seen and len(list(iter_samples(tmp_path / name))) == len(seen)


def test_index_writes_the_bytes_of_a_sorted_copy(tmp_path):
    """write_index adds shard_sha256 with `assign` and write_parquet sorts only rows out of key order:
    the bytes are those of the old path (a deep copy, the column set, a stable sort, from_pandas),
    for rows in order, out of order and with equal keys; the caller's frame is left as it was."""
    import hashlib

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pas.io.shards import write_index

    img = encode_image(Image.new("RGB", (8, 8)), "jpg")
    with ShardWriter(tmp_path, maxcount=3) as w:
        for i in range(8):
            w.write(f"k{i}", img, {})
    sha = {s: hashlib.sha256((tmp_path / s).read_bytes()).hexdigest() for s in w.shards}
    base = w.index_frame().assign(caption=["a", None, "ü", None, "b", "c", None, "d"],
                                  concepts=[["x"], [], ["x", "y"], ["z"], [], ["x"], ["y"], []])
    for name, frame in (("sorted", base), ("reversed", base.iloc[::-1]),
                        ("ties", base.assign(key=["k1", "k0", "k1", "k2", "k2", "k0", "k3", "k3"]))):
        before = frame.copy()
        write_index(frame, tmp_path)
        old = frame.copy()
        old["shard_sha256"] = old["shard"].map(sha).astype(object)
        old = old.sort_values("key", kind="stable").reset_index(drop=True)
        pq.write_table(pa.Table.from_pandas(old, preserve_index=False), tmp_path / "old.parquet")
        assert (tmp_path / "index.parquet").read_bytes() == (tmp_path / "old.parquet").read_bytes(), name
        pd.testing.assert_frame_equal(frame, before)


def test_index_rows_share_their_shards_digest(tmp_path, monkeypatch):
    """write_index's shard_sha256 column holds one str per shard, shared by its rows (a str per row
    was ~0.1 KB each), and refuses rows without a shard."""
    import pandas as pd

    import pas.io.manifest as manifest
    from pas.io.shards import write_index

    img = encode_image(Image.new("RGB", (8, 8)), "jpg")
    with ShardWriter(tmp_path, maxcount=40) as w:
        for i in range(100):
            w.write(make_key("s", i), img, {})
    seen = []
    write = manifest.write_parquet
    monkeypatch.setattr(manifest, "write_parquet", lambda df, *a, **k: seen.append(df) or write(df, *a, **k))
    write_index(w.index_frame(), tmp_path)
    sha = seen[0]["shard_sha256"]
    assert sha.dtype == object and sha.nunique() == 3 and len({id(v) for v in sha}) == 3
    with pytest.raises(ValueError, match="without a shard"):
        write_index(pd.DataFrame({"key": ["a", "b"], "shard": [w.shards[0], None]}), tmp_path)


@pytest.mark.parametrize("col", [
    ["a", "b", "b", "c"], ["c", "b", "a"], ["Z", "a", "é", "🍜"], ["🍜", "é"], ["a", None, "b"],
    [None, "a"], [1, 2, 2, 5], [3, 1], [0.5, float("nan"), 1.0], [1.0, 2.0], ["x"], [1, "a"],
])
def test_write_parquet_sorts_what_is_out_of_order(tmp_path, col):
    """write_parquet skips the sort of rows already in key order (`_in_order`, in arrow): its bytes
    are those of a stable sort + from_pandas for str (arrow-backed and object, non-ASCII), None,
    NaN, int and mixed keys."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pas.io.manifest import _in_order, write_parquet

    for key in (pd.Series(col), pd.Series(col, dtype=object)):
        df = pd.DataFrame({"key": key, "i": range(len(col))})
        try:
            old = df.sort_values("key", kind="stable").reset_index(drop=True)
        except TypeError:               # mixed types: the sort raises, as before
            with pytest.raises(TypeError):
                write_parquet(df, tmp_path / "new.parquet")
            continue
        pq.write_table(pa.Table.from_pandas(old, preserve_index=False), tmp_path / "old.parquet")
        write_parquet(df, tmp_path / "new.parquet")
        assert (tmp_path / "new.parquet").read_bytes() == (tmp_path / "old.parquet").read_bytes()
        assert _in_order(key) == (old["i"].tolist() == list(range(len(col))) and bool(key.notna().all()))
