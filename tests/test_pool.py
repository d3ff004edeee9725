import json
import struct
import zlib

import faiss
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pas.data.images import BadImage, load_rgb, to_rgb_on_white
from pas.data.pool import PoolParams, build_pool, category_of
from pas.io.shards import iter_samples
from pas.params import ParamsError


def _huge_png_header(path, w, h):
    """A PNG whose header claims w×h pixels (a decompression bomb) without the pixel data."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture()
def folder(tmp_path, clipart_food):
    root = tmp_path / "imgs"
    (root / "fruit").mkdir(parents=True)
    (root / "misc").mkdir()
    for i, f in enumerate(clipart_food[:5]):
        (root / "fruit" / f"real{i}.png").write_bytes(f.read_bytes())
    # RGBA: transparent red square → must come out on white, not black
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (10, 10, 30, 30))
    rgba.save(root / "misc" / "rgba.png")
    # palette with transparency, LA
    p = Image.new("P", (32, 32), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(root / "misc" / "palette.png", transparency=0)
    Image.new("LA", (32, 32), (50, 0)).save(root / "misc" / "la.png")
    # oversized: a real 3000×2000 image (downscaled) and a bomb header (skipped before decoding)
    Image.new("RGB", (3000, 2000), (0, 0, 255)).save(root / "misc" / "big.png")
    _huge_png_header(root / "misc" / "bomb.png", 30000, 30000)
    # truncated PNG and a non-image
    data = (root / "fruit" / "real0.png").read_bytes()
    (root / "misc" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "misc" / "notes.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (4, 4)).save(root / "misc" / "tiny.png")
    return root


def test_load_rgb_composites_on_white(folder):
    im = load_rgb(folder / "misc" / "rgba.png")
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((20, 20)) == (255, 0, 0)
    assert load_rgb(folder / "misc" / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(folder / "misc" / "la.png").getpixel((0, 0)) == (255, 255, 255)  # alpha 0


def test_pillows_own_bomb_guard_stays_on(tmp_path, recwarn):
    """No process-wide MAX_IMAGE_PIXELS = None: Pillow's guard refuses a bomb header before decoding
    (past twice its limit it raises, past its limit it warns: both are too_large, no warning leaks);
    a larger explicit max_pixels raises Pillow's limit, never switches it off."""
    from PIL import Image

    from pas.data.images import open_image

    assert Image.MAX_IMAGE_PIXELS is not None
    limit = Image.MAX_IMAGE_PIXELS
    _huge_png_header(tmp_path / "over2x.png", 30000, 30000)           # 900 Mpix > 2 × 89.5 Mpix
    _huge_png_header(tmp_path / "over1x.png", 10000, 10000)           # 100 Mpix: Pillow's warning
    for name in ("over2x.png", "over1x.png"):
        with pytest.raises(BadImage) as e:
            open_image(tmp_path / name, limit, name)
        assert e.value.reason == "too_large" and "decompression bomb" in e.value.detail.lower(), e.value.detail
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    _huge_png_header(tmp_path / "60mpix.png", 8000, 7500)             # under Pillow's limit, over ours
    with pytest.raises(BadImage, match="60 Mpix > 50"):
        open_image(tmp_path / "60mpix.png", 50_000_000, "60mpix.png")
    try:
        with open_image(tmp_path / "over1x.png", 200_000_000, "over1x.png") as im:   # allowed explicitly
            assert im.size == (10000, 10000)
        assert Image.MAX_IMAGE_PIXELS == 200_000_000
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_load_rgb_bad_inputs(folder):
    with pytest.raises(BadImage) as e:
        load_rgb(folder / "misc" / "bomb.png", max_pixels=50_000_000)
    assert e.value.reason == "too_large"
    for name, reason in [("truncated.png", "corrupt"), ("notes.jpg", "unreadable"), ("tiny.png", "too_small")]:
        with pytest.raises(BadImage) as e:
            load_rgb(folder / "misc" / name)
        assert e.value.reason == reason, name
    assert max(load_rgb(folder / "misc" / "big.png", max_side=256).size) == 256


def test_to_rgb_on_white_keeps_opaque_pixels():
    im = Image.new("RGB", (3, 3), (10, 20, 30))
    assert to_rgb_on_white(im).getpixel((1, 1)) == (10, 20, 30)


@pytest.mark.parametrize("workers", [1, 2])
def test_build_pool_folder(folder, tmp_path, tiny_clip, workers):
    p = PoolParams(source=str(folder), max_side=128, shard_size=4, workers=workers)
    out = tmp_path / f"pool{workers}"
    m = build_pool(p, tiny_clip, out)
    assert m["n_files"] == 13 and m["n_indexed"] == 9 and m["n_skipped"] == 4
    assert (m["skipped_too_large"], m["skipped_corrupt"], m["skipped_unreadable"], m["skipped_too_small"]) \
        == (1, 1, 1, 1)
    idx = pd.read_parquet(out / "index.parquet")
    skipped = pd.read_parquet(out / "skipped.parquet")
    assert sorted(skipped.reason) == ["corrupt", "too_large", "too_small", "unreadable"]
    assert set(idx.category) == {"fruit", "misc"}
    assert idx.key.is_unique and idx.key.str.match(r"^p[0-9a-f]{16}$").all()
    big = idx[idx.path == "misc/big.png"].iloc[0]
    assert (big.width, big.height, big.stored_width, big.stored_height) == (3000, 2000, 128, 85)
    # shards hold ≤ 4 samples, in index order, and agree with the index
    samples = list(iter_samples(out))
    assert [s.key for s in samples] == list(idx.key)
    assert [s.shard for s in samples] == list(idx.shard)
    assert len(set(idx.shard)) == 3
    # embeddings: one L2-normalised row per indexed image, equal to embedding the stored bytes
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (9, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(emb[:2], tiny_clip.encode_images([s.pil() for s in samples[:2]]), atol=1e-5)
    # the faiss index finds each image as its own nearest neighbour
    index = faiss.read_index(str(out / "faiss.index"))
    _, nn = index.search(emb, 1)
    sims = emb @ emb.T
    np.testing.assert_array_equal(sims[np.arange(9), nn[:, 0]], sims.max(1))
    meta = json.loads((out / "pool.json").read_text())
    assert meta["clip_fingerprint"] == tiny_clip.fingerprint and meta["n"] == 9


def test_build_pool_is_deterministic_and_worker_independent(folder, tmp_path, tiny_clip):
    outs = []
    for w in (1, 2):
        out = tmp_path / f"p{w}"
        build_pool(PoolParams(source=str(folder), max_side=96, workers=w), tiny_clip, out)
        outs.append(out)
    for name in ("pool-000000.tar", "index.parquet", "embeddings.npy", "skipped.parquet"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_pool_include_exclude_and_reindex_shards(folder, tmp_path, tiny_clip):
    m = build_pool(PoolParams(source=str(folder), include=["fruit"], workers=1), tiny_clip, tmp_path / "a")
    assert m["n_indexed"] == 5
    m = build_pool(PoolParams(source=str(folder), exclude=["fruit"], workers=1), tiny_clip, tmp_path / "b")
    assert m["n_indexed"] == 4
    # a pool can be built from existing webdataset shards (keys kept)
    m2 = build_pool(PoolParams(source=str(tmp_path / "a"), format="shards", workers=1), tiny_clip,
                    tmp_path / "c")
    assert m2["n_indexed"] == 5
    a = pd.read_parquet(tmp_path / "a" / "index.parquet")
    c = pd.read_parquet(tmp_path / "c" / "index.parquet")
    assert list(a.key) == list(c.key)


def test_category_of():
    from pathlib import Path
    assert category_of(Path("food/fruit/a.png")) == "food/fruit"
    assert category_of(Path("a.png")) == ""


def test_pool_params_validation():
    with pytest.raises(ParamsError, match="index"):
        PoolParams(index="annoy")
    with pytest.raises(ParamsError, match="shard_size"):
        PoolParams(shard_size=20_000)


def test_missing_source_is_clear(tmp_path, tiny_clip):
    with pytest.raises(ParamsError, match="pool.source"):
        build_pool(PoolParams(source=str(tmp_path / "nope")), tiny_clip, tmp_path / "o")


# --- issue 23: explicit format, empty pools, odd folder entries, EXIF orientation ---

def test_stray_tar_does_not_switch_a_folder_to_shards(folder, tmp_path, tiny_clip):
    import tarfile
    with tarfile.open(folder / "backup.tar", "w"):      # an empty archive left beside the images
        pass
    m = build_pool(PoolParams(source=str(folder), workers=1), tiny_clip, tmp_path / "o")
    assert m["n_indexed"] == 9 and m["n_skipped"] == 4


def test_pool_format_is_validated():
    with pytest.raises(ParamsError, match="format"):
        PoolParams(format="auto")


def test_empty_pool_is_an_error(tmp_path, tiny_clip):
    import tarfile
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ParamsError, match=r"pool.source=.*empty.*0 images") as e:
        build_pool(PoolParams(source=str(empty), workers=1), tiny_clip, tmp_path / "o")
    assert "\n" not in str(e.value)
    # only shards there, read as a folder: the error says which format reads them
    with tarfile.open(empty / "a.tar", "w"):
        pass
    with pytest.raises(ParamsError, match="pool.format: shards"):
        build_pool(PoolParams(source=str(empty), workers=1), tiny_clip, tmp_path / "o")
    # every file skipped is no pool either
    Image.new("RGB", (4, 4)).save(empty / "tiny.png")
    with pytest.raises(ParamsError, match="1 too_small"):
        build_pool(PoolParams(source=str(empty), workers=1), tiny_clip, tmp_path / "o")
    # shards asked for where there are none
    with pytest.raises(ParamsError, match="no .tar shards"):
        build_pool(PoolParams(source=str(tmp_path / "o"), format="shards"), tiny_clip, tmp_path / "o2")


@pytest.fixture()
def odd_folder(tmp_path, clipart_food):
    """Good images plus every kind of folder entry that is not a readable image file."""
    import os
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    good = clipart_food[0].read_bytes()
    (root / "a" / "good.png").write_bytes(good)
    (root / "a" / "inside.png").symlink_to("good.png")              # a link within the pool: read
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(clipart_food[1].read_bytes())
    (root / "a" / "outside.png").symlink_to(outside)                # a link out of the pool
    os.mkfifo(root / "a" / "pipe.png")                              # would block any reader forever
    (root / "a" / "dangling.png").symlink_to("missing.png")
    (root / "a" / "loop.png").symlink_to("loop.png")
    bad = os.path.join(os.fsencode(root / "a"), b"caf\xe9.png")      # Latin-1 name, not UTF-8
    with open(bad, "wb") as f:
        f.write(clipart_food[2].read_bytes())
    return root


def test_odd_folder_entries_are_skipped_and_counted(odd_folder, tmp_path, tiny_clip):
    m = build_pool(PoolParams(source=str(odd_folder), workers=1), tiny_clip, tmp_path / "o")
    assert m["n_indexed"] == 2 and m["n_skipped"] == 5
    assert {k: v for k, v in m.items() if k.startswith("skipped_")} == {
        "skipped_bad_filename": 1, "skipped_dangling_link": 1, "skipped_not_a_file": 1,
        "skipped_symlink_loop": 1, "skipped_symlink_outside": 1}
    skipped = pd.read_parquet(tmp_path / "o" / "skipped.parquet")
    assert dict(zip(skipped.path, skipped.reason))["a/caf\\xe9.png"] == "bad_filename"
    assert sorted(pd.read_parquet(tmp_path / "o" / "index.parquet").path) == ["a/good.png", "a/inside.png"]
    # following links out of the pool is a choice
    m = build_pool(PoolParams(source=str(odd_folder), follow_symlinks_outside=True, workers=1), tiny_clip,
                   tmp_path / "o2")
    assert m["n_indexed"] == 3 and "skipped_symlink_outside" not in m


def test_pool_check_lists_what_stops_dvc(odd_folder, folder, tmp_path, capsys):
    import yaml

    from tests.stage_helpers import load_stage
    stage = load_stage("pool")
    params = tmp_path / "params.yaml"
    for src, rc in [(odd_folder, 1), (folder, 0)]:
        params.write_text(yaml.safe_dump({"pool": {"source": str(src)}}))
        assert stage.main(["--check", "--params", str(params)]) == rc
    out = capsys.readouterr().out
    assert "not_a_file\ta/pipe.png\n" in out and "dangling_link\ta/dangling.png\t-> missing.png\n" in out
    assert "symlink_outside\ta/outside.png" in out and "good.png" not in out
    assert "5 entries skipped for what they are, 3 of them stop DVC" in out


def _sideways_jpeg(path, orientation=6):
    """A 60×30 photo stored sideways: red left half, blue right; EXIF says turn it (6 = 90° clockwise)."""
    im = Image.new("RGB", (60, 30), (255, 0, 0))
    im.paste((0, 0, 255), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path, tiny_clip):
    root = tmp_path / "photos"
    root.mkdir()
    _sideways_jpeg(root / "turned.jpg")
    Image.new("RGB", (40, 20), (0, 255, 0)).save(root / "plain.png")
    im = load_rgb(root / "turned.jpg")
    assert im.size == (30, 60) and im.info["exif_orientation"] == 6
    r, g, b = im.getpixel((15, 5))          # turned clockwise: the red left half is now on top
    assert r > 200 and b < 60
    m = build_pool(PoolParams(source=str(root), workers=1), tiny_clip, tmp_path / "o")
    assert m["n_indexed"] == 2 and m["n_exif_rotated"] == 1
    idx = pd.read_parquet(tmp_path / "o" / "index.parquet").set_index("path")
    assert tuple(idx.loc["turned.jpg", ["width", "height", "stored_width", "stored_height"]]) == (30, 60, 30, 60)
    # shard input is turned upright the same way
    import io
    import tarfile
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "s.tar", "w") as tar:
        for name, data in [("x1.jpg", (root / "turned.jpg").read_bytes()), ("x1.json", b"{}"),
                           ("x2.jpg", b"not an image"), ("x2.json", b"{}")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    m = build_pool(PoolParams(source=str(shards), format="shards", workers=1), tiny_clip, tmp_path / "o3")
    assert (m["n_indexed"], m["n_exif_rotated"], m["skipped_unreadable"]) == (1, 1, 1)


def test_shard_member_with_non_utf8_name_is_skipped(tmp_path, tiny_clip, clipart_food):
    import io
    import tarfile
    shards = tmp_path / "shards"
    shards.mkdir()
    img = clipart_food[0].read_bytes()
    with tarfile.open(shards / "s.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("caf\udce9.png", img), ("caf\udce9.json", b"{}"), ("ok.png", img), ("ok.json", b"{}")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    m = build_pool(PoolParams(source=str(shards), format="shards", workers=1), tiny_clip, tmp_path / "o")
    assert m["n_indexed"] == 1 and m["skipped_bad_filename"] == 1


def test_pool_stage_does_no_embedding_work_when_retrieval_uses_the_service(tmp_path, monkeypatch):
    """retrieve.backend clip_service: the stage writes an empty pool, reading neither pool.source
    (the presets' placeholder, a folder without images) nor CLIP (a folder that does not exist)."""
    import pas.data.pool as pool_mod
    from pas.io.manifest import read_metrics, read_parquet
    from tests.stage_helpers import load_stage

    def boom(*a, **k):
        raise AssertionError("pool was built")
    monkeypatch.setattr(pool_mod, "build_pool", boom)
    stage = load_stage("pool")
    monkeypatch.setattr(stage, "build_pool", boom)
    (tmp_path / "params.yaml").write_text("pool:\n  source: configs/no-pool\nretrieve:\n  backend: clip_service\n"
                                          "  service: {url: 'http://127.0.0.1:9/knn-service'}\n")
    out = tmp_path / "pool"
    argv = ["--clip", str(tmp_path / "no-clip"), "--out", str(out), "--params", str(tmp_path / "params.yaml"),
            "--metrics", str(tmp_path / "m.json")]
    assert stage.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.parquet", "pool.json"]
    assert len(read_parquet(out / "index.parquet")) == 0
    assert json.loads((out / "pool.json").read_text())["unused"] == "retrieve.backend is clip_service"
    assert read_metrics(tmp_path / "m.json")["n_indexed"] == 0
    from pas.collect.retrieve import load_pool
    with pytest.raises(ValueError, match="missing faiss.index"):    # a pool retrieval refuses it
        load_pool(out)


# --- issue 23: resume after kill -9; issue 24: decode in worker processes ---

def _resume_folder(root, clipart_food):
    """12 clipart PNGs in two categories + one truncated file: 7 chunks of 2 entries (CHUNK = 2)."""
    for i, f in enumerate(clipart_food[:12]):
        d = root / ("a" if i < 6 else "b")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:02d}.png").write_bytes(f.read_bytes())
    (root / "b" / "99.png").write_bytes(clipart_food[0].read_bytes()[:300])
    return root


def _pool_stage_files(tmp_path, source, clip_dir):
    """The stage's argv; its decode processes come from PAS_POOL_WORKERS (a machine setting)."""
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"pool": {"source": str(source), "max_side": 64, "batch_size": 3,
                                               "shard_size": 5}}))
    return lambda out, cache: ["--clip", str(clip_dir), "--out", str(tmp_path / out), "--params", str(params),
                               "--metrics", str(tmp_path / f"{out}.json"), "--cache", str(tmp_path / cache)]


def _chunk_files(cache):
    return sorted(q for q in cache.glob("*.npz") if not q.name.startswith(".tmp"))


def test_workers_decode_chunks_in_order_with_the_same_bytes(tmp_path, clipart_food, tiny_clip, monkeypatch):
    """7 chunks decoded inline and in 2 spawned processes: the same bytes."""
    import pas.data.pool as pool_mod
    from tests.stage_helpers import outputs

    monkeypatch.setattr(pool_mod, "CHUNK", 2)
    src = _resume_folder(tmp_path / "src", clipart_food)
    for w in (1, 2):
        m = build_pool(PoolParams(source=str(src), max_side=64, batch_size=3, shard_size=5, workers=w),
                       tiny_clip, tmp_path / f"w{w}")
        assert (m["n_indexed"], m["skipped_corrupt"], m["n_shards"], m["n_chunks_computed"]) == (12, 1, 3, 7)
    assert outputs(tmp_path / "w1") == outputs(tmp_path / "w2")


KILLABLE = """
import runpy, sys, time
import pas.data.pool as pool
from pas.io.resume import WorkStore
pool.CHUNK = 2
put = WorkStore.put
def slow_put(self, *a, **k):            # a window to kill the run in after each finished chunk
    put(self, *a, **k)
    time.sleep(1.0)
WorkStore.put = slow_put
sys.argv = ["pool.py"] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_sigkill_half_way_resumes_only_the_missing_chunks(tmp_path, clipart_food, tiny_clip_dir, monkeypatch):
    """The stage (2 decode processes) SIGKILLed, with its workers, after about half of its 7 chunks:
    the rerun decodes and embeds only the chunks that were not finished and writes the bytes of an
    uninterrupted run (shards, index, embeddings, faiss index, skipped list, metrics)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pas.data.pool as pool_mod
    from tests.helpers import read_run
    from tests.stage_helpers import load_stage, outputs

    root = Path(__file__).resolve().parents[1]
    src = _resume_folder(tmp_path / "src", clipart_food)
    argv = _pool_stage_files(tmp_path, src, tiny_clip_dir)
    cache = tmp_path / "cache"
    script = KILLABLE.format(argv=argv("out", "cache"), script=str(root / "stages" / "pool.py"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root / "src"), "PAS_POOL_WORKERS": "2"},
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(_chunk_files(cache)) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, f"the stage ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)                # the stage and its decode workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(_chunk_files(cache))
    assert 3 <= done < 7
    assert not (tmp_path / "out" / "index.parquet").exists() and not (tmp_path / "out.json").exists()

    monkeypatch.setattr(pool_mod, "CHUNK", 2)
    decoded = []
    real = pool_mod.decode_chunk
    monkeypatch.setattr(pool_mod, "decode_chunk", lambda item, p: decoded.append(item[2]) or real(item, p))
    monkeypatch.setenv("PAS_POOL_WORKERS", "1")          # workers: no part of a chunk's id
    argv1 = _pool_stage_files(tmp_path, src, tiny_clip_dir)
    assert load_stage("pool").main(argv1("out", "cache")) == 0
    assert len(decoded) == 7 - done                    # only the chunks the killed run had not finished
    assert read_run(tmp_path / "out.json")["n_chunks_resumed"] == done
    assert read_run(tmp_path / "out.json")["n_chunks_computed"] == 7 - done
    assert len(_chunk_files(cache)) == 7 and not list(cache.glob(".tmp-*"))
    # an uninterrupted run into a fresh cache: the same bytes
    assert load_stage("pool").main(argv1("ref", "ref_cache")) == 0
    assert outputs(tmp_path / "out") == outputs(tmp_path / "ref")
    assert (tmp_path / "out.json").read_bytes() == (tmp_path / "ref.json").read_bytes()
    assert sorted(outputs(tmp_path / "ref")) == ["embeddings.npy", "faiss.index", "index.parquet",
                                                 "pool-000000.tar", "pool-000001.tar", "pool-000002.tar",
                                                 "pool.json", "skipped.parquet"]


def test_torn_or_stale_chunk_files_are_recomputed(tmp_path, clipart_food, tiny_clip_dir, monkeypatch, caplog):
    """A torn chunk file is ignored (warned with its path) and redone; rewriting a file with the same
    bytes (new mtime and inode) reuses every chunk; other bytes redo that file's chunk only; --fresh
    redoes all."""
    import logging
    import os

    import pas.data.pool as pool_mod
    from tests.stage_helpers import load_stage, outputs

    monkeypatch.setattr(pool_mod, "CHUNK", 2)
    decoded = []
    real = pool_mod.decode_chunk
    monkeypatch.setattr(pool_mod, "decode_chunk", lambda item, p: decoded.append(item[2]) or real(item, p))
    src = _resume_folder(tmp_path / "src", clipart_food)
    monkeypatch.setenv("PAS_POOL_WORKERS", "1")
    argv = _pool_stage_files(tmp_path, src, tiny_clip_dir)
    stage = load_stage("pool")
    assert stage.main(argv("full", "cache")) == 0
    full = outputs(tmp_path / "full")
    chunks = _chunk_files(tmp_path / "cache")
    assert len(decoded) == 7 and len(chunks) == 7

    def rerun(out, *extra):
        decoded.clear()
        assert stage.main([*argv(out, "cache"), *extra]) == 0
        assert outputs(tmp_path / out) == full
        return len(decoded)

    torn = chunks[3]
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])           # a copy cut short, a disk full
    with caplog.at_level(logging.WARNING):
        assert rerun("torn") == 1
    assert str(torn) in caplog.text and "recomputing" in caplog.text
    assert torn.read_bytes() != data[: len(data) // 2]     # replaced by the recomputed chunk
    torn.write_bytes(b"")
    assert rerun("empty") == 1
    f = src / "a" / "03.png"
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)                                # `dvc checkout`: same bytes, new inode and mtime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert rerun("rewritten") == 0
    assert rerun("fresh", "--fresh") == 7
    (src / "a" / "03.png").write_bytes(clipart_food[20].read_bytes())   # other bytes, same name
    decoded.clear()
    assert stage.main(argv("changed", "cache")) == 0
    assert decoded == [["a/02.png", "a/03.png"]] and outputs(tmp_path / "changed") != full
    assert len(_chunk_files(tmp_path / "cache")) == 7  # the stale chunk was pruned


def test_decode_workers_are_a_machine_setting_not_a_param(tmp_path):
    """PAS_POOL_WORKERS, like PAS_ENGINE: a params.yaml key would rerun the stage (and pool_models@clip)
    for a setting that changes no byte, so the old key is refused with where it went."""
    from pas.data.pool import workers_from_env
    from pas.params import ParamsError, build

    assert workers_from_env({}) == 0 and workers_from_env({"PAS_POOL_WORKERS": " 3 "}) == 3
    with pytest.raises(ParamsError, match="PAS_POOL_WORKERS='two'"):
        workers_from_env({"PAS_POOL_WORKERS": "two"})
    with pytest.raises(ParamsError, match="pool.workers: removed; .*PAS_POOL_WORKERS"):
        build(PoolParams, {"pool": {"source": "x", "workers": 2}}, "pool")


def _shard_input(root, clipart_food, n=9, bad=(3,)):
    """One tar of `n` clipart PNGs, members `bad` replaced by bytes that are no image."""
    import io
    import tarfile

    root.mkdir(parents=True)
    with tarfile.open(root / "s.tar", "w") as tar:
        for i in range(n):
            data = b"not an image" if i in bad else clipart_food[i].read_bytes()
            for name, blob in ((f"x{i:02d}.png", data), (f"x{i:02d}.json", b"{}")):
                ti = tarfile.TarInfo(name)
                ti.size = len(blob)
                tar.addfile(ti, io.BytesIO(blob))
    return root


def test_skipped_rows_of_shard_input_are_the_same_bytes_every_run(tmp_path, clipart_food, tiny_clip):
    # Pillow's message names the in-memory file with its address: it must not reach skipped.parquet
    src = _shard_input(tmp_path / "in", clipart_food)
    p = PoolParams(source=str(src), format="shards", max_side=32, workers=1)
    for out in ("a", "b"):
        build_pool(p, tiny_clip, tmp_path / out)
    a, b = ((tmp_path / o / "skipped.parquet").read_bytes() for o in ("a", "b"))
    assert a == b
    detail = pd.read_parquet(tmp_path / "a" / "skipped.parquet").loc[0, "detail"]
    assert detail.startswith("s.tar/x03: cannot identify image file") and " at 0x" not in detail


def test_max_images_cut_is_not_served_from_an_uncut_resume_file(tmp_path, clipart_food, tiny_clip, monkeypatch):
    """A shards pool cut at max_images inside a chunk: the chunk's resume file (written whole by an
    uncut run) must not stand in for it, and the cut run must not cache the cut chunk as whole."""
    import pas.data.pool as pool_mod

    monkeypatch.setattr(pool_mod, "CHUNK", 4)
    src = _shard_input(tmp_path / "in", clipart_food, n=9, bad=())
    kw = dict(source=str(src), format="shards", max_side=32, shard_size=4, batch_size=3, workers=1)
    build_pool(PoolParams(**kw), tiny_clip, tmp_path / "whole", cache_dir=tmp_path / "cache")
    cut = build_pool(PoolParams(**kw, max_images=6), tiny_clip, tmp_path / "cut", cache_dir=tmp_path / "cache")
    fresh = build_pool(PoolParams(**kw, max_images=6), tiny_clip, tmp_path / "fresh")
    assert cut["n_indexed"] == fresh["n_indexed"] == 6
    for name in ("index.parquet", "embeddings.npy", "pool-000000.tar", "pool-000001.tar"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    # and the cut run's cache still serves the uncut pool
    again = build_pool(PoolParams(**kw), tiny_clip, tmp_path / "again", cache_dir=tmp_path / "cache")
    assert again["n_indexed"] == 9
    assert (tmp_path / "again" / "embeddings.npy").read_bytes() == (tmp_path / "whole" / "embeddings.npy").read_bytes()
