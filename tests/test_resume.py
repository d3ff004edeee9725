"""pas.io.resume: the one work store — torn payloads and markers are misses, the marker is written last,
input identity is the bytes."""

import logging
import os

import numpy as np
import pandas as pd
import pytest

from pas.io.resume import Arrays, Table, WorkStore, WrittenFile, file_identity, read_json
from pas.jsonio import write_atomic


@pytest.mark.parametrize("cut", [0, 10, 100, -30])
def test_torn_chunk_file_is_a_miss_with_a_warning(tmp_path, caplog, cut):
    cache = WorkStore(tmp_path, "run")
    cache.put(["item", 1], (["a", "b"], np.arange(6, dtype=np.float32).reshape(2, 3)))
    keys, x = cache.get(["item", 1])
    assert keys == ["a", "b"] and x.tolist() == [[0, 1, 2], [3, 4, 5]] and cache.n_resumed == 1
    assert read_json(cache.path(["item", 1]).with_suffix(".json"))["stats"] == {"n": 2}
    (path,) = tmp_path.glob("*.npz")
    data = path.read_bytes()
    path.write_bytes(data[:cut])                        # a copy or write cut short
    with caplog.at_level(logging.WARNING):
        assert cache.get(["item", 1]) is None
    assert str(path) in caplog.text and "recomputing" in caplog.text
    cache.put(["item", 1], (["a", "b"], x))               # the recomputed item replaces it
    assert cache.get(["item", 1])[0] == ["a", "b"]


def test_same_size_damage_is_caught_by_the_marker_sha256(tmp_path, caplog):
    store = WorkStore(tmp_path, "run", Table())
    store.put("t", pd.DataFrame({"key": ["a", "b"], "v": [1.0, 2.0]}))
    path = store.path("t")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                        # one flipped byte: same size
    path.write_bytes(bytes(data))
    assert store.has("t")                               # the cheap check sees only the size
    with caplog.at_level(logging.WARNING):
        assert store.get("t") is None
    assert "sha256" in caplog.text


def test_marker_is_written_last_and_names_other_runs_apart(tmp_path):
    store = WorkStore(tmp_path, "run", Table())
    df = pd.DataFrame({"key": ["b", "a"], "v": [2, 1]})
    store.put("t", df)
    pd.testing.assert_frame_equal(store.get("t"), df)     # its row order kept
    store.path("t").with_suffix(".json").unlink()         # killed between payload and marker
    assert not store.has("t") and store.get("t") is None
    store.put("t", df)
    assert store.has("t") and not WorkStore(tmp_path, "other run", Table()).has("t")
    marker = read_json(store.path("t").with_suffix(".json"))
    assert marker["stats"] == {"n": 2} and marker["size"] == store.path("t").stat().st_size


def test_prune_deletes_the_items_of_other_runs_and_temp_files(tmp_path):
    old = WorkStore(tmp_path, "old", Table())
    old.put("t", pd.DataFrame({"v": [1]}))
    (tmp_path / ".tmp-x.parquet").write_bytes(b"half")
    new = WorkStore(tmp_path, "new", Table())
    new.put("t", pd.DataFrame({"v": [2]}))
    assert new.prune() == 2                           # the old item and the temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.path("t").name,
                                                                  new.path("t").with_suffix(".json").name])


def test_written_file_codec_checks_the_payload_exists(tmp_path):
    store = WorkStore(tmp_path, "run", WrittenFile(".tar"))
    with pytest.raises(FileNotFoundError, match="without writing"):
        store.put("s", {"n": 3})
    store.path("s").write_bytes(b"tar bytes")           # the work writes its own payload
    store.put("s", {"n": 3})
    assert store.get("s") == {"n": 3}


def test_missing_chunk_is_a_silent_miss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert WorkStore(tmp_path, "run").get("nothing") is None
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
    cache = WorkStore(tmp_path, "run", Arrays(("records", "x")))
    assert not cache.has("c")
    cache.put("c", {"records": np.frombuffer(b"[]", np.uint8), "x": np.zeros((0, 4), np.float32)})
    assert cache.has("c") and not WorkStore(tmp_path, "other run", Arrays()).has("c")
    z = cache.get("c")
    assert z["records"].tobytes() == b"[]" and z["x"].shape == (0, 4)
    with caplog.at_level(logging.WARNING):
        assert WorkStore(tmp_path, "run", Arrays(("records", "jpeg"))).get("c") is None  # another layout
        assert WorkStore(tmp_path, "run").get("c") is None                               # no keys in it
    assert "KeyError" in caplog.text
