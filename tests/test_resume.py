"""pas.io.resume: torn cache files are misses, input identity is the bytes."""

import logging
import os

import numpy as np
import pytest

from pas.io.resume import ChunkCache, file_identity, read_json
from pas.jsonio import write_atomic


@pytest.mark.parametrize("cut", [0, 10, 100, -30])
def test_torn_chunk_file_is_a_miss_with_a_warning(tmp_path, caplog, cut):
    cache = ChunkCache(tmp_path, "run")
    cache.put(["item", 1], (["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3)))
    keys, x = cache.get(["item", 1])
    assert keys == ["a", "b"] and x.tolist() == [[0, 1, 2], [3, 4, 5]]
    (path,) = tmp_path.glob("*.npz")
    data = path.read_bytes()
    path.write_bytes(data[:cut])                        # a copy or write cut short
    with caplog.at_level(logging.WARNING):
        assert cache.get(["item", 1]) is None
    assert str(path) in caplog.text and "recomputing" in caplog.text
    cache.put(["item", 1], (["a", "b"], x))               # the recomputed item replaces it
    assert cache.get(["item", 1])[0] == ["a", "b"]


def test_missing_chunk_is_a_silent_miss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert ChunkCache(tmp_path, "run").get("nothing") is None
    assert caplog.text == ""


def test_file_identity_is_content_not_mtime(tmp_path):
    """A `dvc checkout` or an upstream rerun that rewrites the same bytes keeps the identity; other
    bytes of the same size change it."""
    from tests.test_shards import _new_process

    f = tmp_path / "shard-000000.tar"
    f.write_bytes(b"x" * 4096)
    ident = file_identity(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    assert file_identity(f) == ident
    f.unlink()
    f.write_bytes(b"x" * 4096)                          # a new file (inode), same bytes
    assert file_identity(f) == ident
    f.write_bytes(b"x" * 4095 + b"y")
    _new_process()                                      # the mtime may not have moved within a few ms
    assert file_identity(f) != ident


def test_resume_json_torn_or_missing_is_none(tmp_path, caplog):
    p = tmp_path / "m.json"
    assert read_json(p) is None
    write_atomic(p, '{"fingerprint": "abc", "n": 3}\n')
    assert read_json(p) == {"fingerprint": "abc", "n": 3} and not list(tmp_path.glob(".tmp-*"))
    for torn in (b"", b'{"fingerprint": "ab', b"\xff\xfe"):
        p.write_bytes(torn)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert read_json(p) is None
        assert str(p) in caplog.text


def test_named_arrays_round_trip_and_a_missing_one_is_a_miss(tmp_path, caplog):
    cache = ChunkCache(tmp_path, "run")
    assert not cache.has("c")
    cache.put_arrays("c", records=np.frombuffer(b"[]", np.uint8), x=np.zeros((0, 4), np.float32))
    assert cache.has("c") and not ChunkCache(tmp_path, "other run").has("c")
    z = cache.get_arrays("c", ("records", "x"))
    assert z["records"].tobytes() == b"[]" and z["x"].shape == (0, 4)
    with caplog.at_level(logging.WARNING):
        assert cache.get_arrays("c", ("records", "jpeg")) is None      # a file of another layout
        assert cache.get("c") is None                                   # no keys in it
    assert "KeyError" in caplog.text
