import tarfile

import pytest
from PIL import Image

from pas.io.manifest import read_metrics, write_metrics
from pas.io.shards import ShardWriter, encode_image, iter_samples, make_key


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


@pytest.mark.parametrize("bad", ["../etc/passwd", "a.b", "a/b", "", "ключ", "x" * 200])
def test_unsafe_keys_refused(tmp_path, bad):
    with ShardWriter(tmp_path) as w, pytest.raises(ValueError, match="unsafe sample key"):
        w.write(bad, b"", {})


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
