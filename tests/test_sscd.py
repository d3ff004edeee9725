"""SSCD model module: tiny seeded model (reproducible bytes), loading, URL resolution, descriptors."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pas.hashing import sha256_file
from pas.models import sscd


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return sscd.build_tiny_sscd(tmp_path_factory.mktemp("sscd") / "a", seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return sscd.load_sscd(tiny_dir)


def test_tiny_same_seed_same_bytes(tiny_dir, tmp_path):
    again = sscd.build_tiny_sscd(tmp_path / "b", seed=0)
    f = sscd.TORCHSCRIPT
    assert sha256_file(tiny_dir / f) == sha256_file(again / f)
    assert (tiny_dir / sscd.PRESET).read_bytes() == (again / sscd.PRESET).read_bytes()
    names = zipfile.ZipFile(tiny_dir / f).namelist()
    assert not [n for n in names if n.endswith(".debug_pkl")]       # no absolute source paths inside
    assert str(Path.cwd()) .encode() not in (tiny_dir / f).read_bytes()
    preset = json.loads((tiny_dir / sscd.PRESET).read_text())
    assert preset["dims"] == 512 and preset["resize"] == sscd.TINY_RESIZE
    assert preset["sha256"] == sha256_file(tiny_dir / f) == sscd.fingerprint(tiny_dir)


def test_other_seed_other_weights(tmp_path):
    import torch

    torch.manual_seed(0)
    a = sscd._tiny_module()
    torch.manual_seed(1)
    b = sscd._tiny_module()
    assert not torch.equal(a.embeddings[1].weight, b.embeddings[1].weight)


def test_model_shape_and_normalisation(model):
    import torch

    with torch.no_grad():
        y = model(torch.randn(3, 3, 96, 128))
    assert tuple(y.shape) == (3, 512)
    np.testing.assert_allclose(y.norm(dim=1).numpy(), 1.0, atol=1e-5)
    # SSCD structure: trunk, GeM pooling, linear to 512
    assert hasattr(model, "backbone") and hasattr(model, "embeddings")


def test_target_size_rules():
    # short side → 288, long side rounded to a multiple of 16, whole image kept
    assert sscd.target_size(400, 300, 288) == ((0, 0, 400, 300), (384, 288))
    assert sscd.target_size(300, 400, 288) == ((0, 0, 300, 400), (288, 384))
    assert sscd.target_size(100, 100, 288) == ((0, 0, 100, 100), (288, 288))
    # aspect beyond 3:1 is centre-cropped to 3:1 first
    box, size = sscd.target_size(1000, 100, 160)
    assert box == (350, 0, 650, 100) and size == (480, 160)
    # fixed (H, W): plain resize
    assert sscd.target_size(640, 480, (320, 320)) == ((0, 0, 640, 480), (320, 320))


def test_descriptors_batching_matches_one_by_one(model):
    rng = np.random.default_rng(0)
    sizes = [(90, 60), (64, 64), (60, 90), (91, 60), (64, 64), (200, 50)]
    pils = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    together = sscd.descriptors(model, pils, resize=64, batch_size=4)
    alone = np.concatenate([sscd.descriptors(model, [p], resize=64, batch_size=1) for p in pils])
    assert together.dtype == np.float32 and together.shape == (6, 512)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    fixed = sscd.descriptors(model, pils, resize=(48, 48), batch_size=3)
    assert fixed.shape == (6, 512)
    assert sscd.descriptors(model, [], resize=64).shape == (0, 512)


def test_resolve_url():
    assert sscd.resolve_url("sscd_disc_mixup") == \
        "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
    assert sscd.resolve_url("https://example.org/m.pt") == "https://example.org/m.pt"
    with pytest.raises(ValueError, match="neither a released model"):
        sscd.resolve_url("sscd_disc_nonexistent")


def test_download_from_file_url_records_sha256(tiny_dir, tmp_path):
    src = tiny_dir / sscd.TORCHSCRIPT
    digest = sha256_file(src)
    out = sscd.download_sscd(src.resolve().as_uri(), tmp_path / "dl", sha256=digest, progress=False)
    preset = json.loads((out / sscd.PRESET).read_text())
    assert preset["sha256"] == digest and preset["url"].startswith("file://")
    assert preset["resize"] == 288 and preset["dims"] == 512
    assert sscd.load_sscd(out) is not None
    # a plain local path works too; a wrong hash is refused and nothing is left behind
    sscd.download_sscd(str(src), tmp_path / "dl2", progress=False)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        sscd.download_sscd(str(src), tmp_path / "dl3", sha256="0" * 64, progress=False)
    assert not (tmp_path / "dl3" / sscd.TORCHSCRIPT).exists()


def test_find_torchscript_local_copy(tiny_dir, tmp_path):
    # the models stage's `local` kind copies the file under its own name
    d = tmp_path / "local"
    d.mkdir()
    (d / "sscd_disc_mixup.torchscript.pt").write_bytes((tiny_dir / sscd.TORCHSCRIPT).read_bytes())
    assert sscd.find_torchscript(d).name == "sscd_disc_mixup.torchscript.pt"
    assert sscd.read_preset(d) == {"resize": 288, "dims": 512}
    (d / "other.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="exactly one"):
        sscd.find_torchscript(d)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "m.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a loadable TorchScript"):
        sscd.load_sscd(bad)


def _jpeg(img: Image.Image, q: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_tiny_model_finds_copies_of_real_clipart(model, clipart_food):
    """Exact copies and JPEG re-encodes are the nearest neighbour of their original among real
    clipart, and score above every unrelated pair of this sample (measured margins are recorded in
    benchmarks/RESULTS-dedup.md; a random trunk compresses all cosines into ≈ [0.95, 1])."""
    from pas.data.images import BadImage, load_rgb

    imgs = []
    for f in clipart_food[::37]:
        try:
            imgs.append(load_rgb(f, max_side=256))
        except BadImage:
            continue
    assert len(imgs) >= 8
    a = sscd.descriptors(model, imgs, resize=sscd.TINY_RESIZE)
    exact = sscd.descriptors(model, [im.copy() for im in imgs], resize=sscd.TINY_RESIZE)
    jpg = sscd.descriptors(model, [_jpeg(im) for im in imgs], resize=sscd.TINY_RESIZE)
    np.testing.assert_allclose((a * exact).sum(1), 1.0, atol=1e-5)
    s = jpg @ a.T
    assert (s.argmax(1) == np.arange(len(imgs))).all()
    off = (a @ a.T)[~np.eye(len(imgs), dtype=bool)]
    assert np.diag(s).min() > off.max()


def test_chunk_work_pickles_without_the_model_and_resolves_auto_where_it_runs(tiny_dir, model, tmp_path):
    """The Ray work unit: shipped without weights; `device: auto` is resolved by the process that runs
    it (a GPU node's actor), not by the driver; its descriptors equal a direct call."""
    import cloudpickle

    from pas.io.shards import ShardWriter, encode_image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    with ShardWriter(tmp_path / "wds", prefix="s") as w:
        for i, im in enumerate(imgs):
            w.write(f"k{i}", encode_image(im), {})
    work = sscd.ChunkDescriptors(tiny_dir, 160, 2, "auto", model=model)
    shipped = cloudpickle.loads(cloudpickle.dumps(work))
    assert shipped.model is None and shipped.device == "auto"
    fn = shipped()
    assert shipped.device == sscd.resolve_device("auto") and shipped.model is not None
    keys, x = fn(("shards", [(str(tmp_path / "wds" / "s-000000.tar"), 1, 3)]))
    assert keys == ["k1", "k2"]
    stored = [Image.open(io.BytesIO(encode_image(im))).convert("RGB") for im in imgs[1:]]
    np.testing.assert_array_equal(x, sscd.descriptors(model, stored, resize=160, batch_size=2))
