"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022, facebookresearch/sscd-copy-detection).

The paper deduplicates with SSCD ("We set λ_dup = 0.6 for the duplicate removal when using SSCD") and
drops images resembling eval test images at 0.45. SSCD is a ResNet trunk, GeM pooling (p = 3), a linear
layer to 512-d and L2 normalisation, shipped as TorchScript; evaluated with the short side resized to
288 (or a fixed 320×320) and ImageNet mean/std.

A model folder (`models/sscd/`, written by the `models` stage) holds one TorchScript file and
`sscd.json` (preset: resize, dims, origin, sha256). Three ways to fill it:
  * `download_sscd(url, dir)` — the real weights (default: `sscd_disc_mixup`), sha256 recorded;
  * `build_tiny_sscd(dir, seed)` — an offline, seeded random-init model of the same shape;
  * the `models` stage's `local` kind — a copied TorchScript file (found by `find_torchscript`).
Loading is always `torch.jit.load` of that file, whatever its origin.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np

from pas.device import resolve_device
from pas.hashing import sha256_file
from pas.jsonio import write_json
from pas.models.files import seed_everything

TORCHSCRIPT = "sscd.torchscript.pt"
PRESET = "sscd.json"
BASE_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/"
# released TorchScript models (README of facebookresearch/sscd-copy-detection); all 512-d except large
RELEASED = {
    "sscd_disc_mixup": (BASE_URL + "sscd_disc_mixup.torchscript.pt", 512),       # the paper's
    "sscd_disc_large": (BASE_URL + "sscd_disc_large.torchscript.pt", 1024),
    "sscd_disc_blur": (BASE_URL + "sscd_disc_blur.torchscript.pt", 512),
    "sscd_disc_advanced": (BASE_URL + "sscd_disc_advanced.torchscript.pt", 512),
    "sscd_imagenet_mixup": (BASE_URL + "sscd_imagenet_mixup.torchscript.pt", 512),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RESIZE = 288          # SSCD's evaluation preset: short side 288
SIZE_STEP = 16                # long side rounded to a multiple of this (shape buckets for batching)
MAX_ASPECT = 3.0              # longer/shorter side beyond this is centre-cropped first

# The tiny offline model: torchvision ResNet with one BasicBlock per stage ("ResNet-10", 4.9M params,
# 512 trunk channels), GeM p=3, Linear 512→512, L2 norm. Evaluated at short side 160 to stay fast on
# CPU (the real preset is 288).
TINY_LAYERS = (1, 1, 1, 1)
TINY_RESIZE = 160
DIMS = 512


# ----------------------------------------------------------------------------------------- model

_CLASSES: dict = {}


def _tiny_classes():
    """The module classes, created once per process (TorchScript caches compiled types by class;
    new class objects would be scripted again under mangled names)."""
    if _CLASSES:
        return _CLASSES["GeM"], _CLASSES["SSCDShaped"]
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock, ResNet

    class GeM(nn.Module):
        """Generalised mean pooling over H, W: (mean x^p)^(1/p), inputs clamped ≥ eps (SSCD p = 3)."""

        def __init__(self, p: float = 3.0, eps: float = 1e-6):
            super().__init__()
            self.p, self.eps = p, eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:      # (N, C, H, W) → (N, C)
            return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    class SSCDShaped(nn.Module):
        """An SSCD-shaped model: ResNet trunk → GeM(p=3) → Linear → L2 normalise."""

        def __init__(self, layers: Sequence[int] = TINY_LAYERS, dims: int = DIMS):
            super().__init__()
            r = ResNet(BasicBlock, list(layers))
            # trunk = ResNet without its avgpool and fc (as SSCD's `Model.backbone`)
            self.backbone = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
            self.embeddings = nn.Sequential(GeM(3.0), nn.Linear(512 * BasicBlock.expansion, dims))

        def forward(self, x: torch.Tensor) -> torch.Tensor:      # (N, 3, H, W) → (N, dims)
            return nn.functional.normalize(self.embeddings(self.backbone(x)), p=2.0, dim=1)

    # the classes are local, so TorchScript qualifies them by this module's name, not a file path
    GeM.__module__ = SSCDShaped.__module__ = __name__
    GeM.__qualname__, SSCDShaped.__qualname__ = "GeM", "SSCDShaped"
    _CLASSES.update(GeM=GeM, SSCDShaped=SSCDShaped)
    return GeM, SSCDShaped


def _tiny_module(layers: Sequence[int] = TINY_LAYERS, dims: int = DIMS):
    return _tiny_classes()[1](layers, dims)


def _write_reproducible(script_module, path: Path) -> None:
    """torch.jit.save, then rewrite the zip so that its bytes depend only on weights and code.

    torch.jit.save fixes member timestamps, but (1) its `*.debug_pkl` records embed absolute paths of
    the Python sources (this checkout, the venv), and (2) `.data/serialization_id` is random per save.
    We drop (1) (debug records only improve TorchScript error messages) and replace (2) by a digest of
    the other members. A third source of variation, the order of module constants, follows Python's
    string hashing; `build_tiny_sscd` therefore scripts in a subprocess with PYTHONHASHSEED=0.
    """
    import hashlib

    import torch

    buf = io.BytesIO()
    torch.jit.save(script_module, buf)
    buf.seek(0)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(buf) as zin:
        members = [(i.filename, zin.read(i.filename)) for i in zin.infolist()
                   if not i.filename.endswith(".debug_pkl")]
    digest = hashlib.sha256()
    for name, data in members:
        if not name.endswith("/.data/serialization_id"):
            digest.update(name.encode() + b"\0" + data)
    sid = str(int(digest.hexdigest(), 16))[:40].encode()
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for name, data in members:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zout.writestr(zi, sid if name.endswith("/.data/serialization_id") else data)
    tmp.replace(path)


def _script_in_child(fn, *args, what: str) -> None:
    """Run `fn(*args)` (a module-level function, JSON-able args) in a child Python with
    PYTHONHASHSEED=0, for byte-reproducible TorchScript (see `_write_reproducible`)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = f"import json, sys; from {fn.__module__} import {fn.__name__}; {fn.__name__}(*json.loads(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code, json.dumps(args)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-2000:]}")


def _build_tiny_here(out: str, seed: int) -> None:
    import torch

    seed_everything(seed)
    model = _tiny_module().eval()
    with torch.no_grad():
        scripted = torch.jit.script(model)
    _write_reproducible(scripted, Path(out) / TORCHSCRIPT)


def build_tiny_sscd(out_dir: str | Path, seed: int = 0) -> Path:
    """Seeded random-init SSCD-shaped TorchScript model in `out_dir`. Same seed → byte-identical files.

    Scripted in a child process with PYTHONHASHSEED=0 (`_script_in_child`).
    A random trunk is a weak copy detector: its descriptors share a large common component, so the
    paper's thresholds 0.6/0.45 do not apply to it (offline profile: 0.9995); see
    benchmarks/RESULTS-dedup.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _script_in_child(_build_tiny_here, str(out.resolve()), int(seed), what="building the tiny SSCD model")
    write_json(out / PRESET, {"kind": "tiny", "seed": seed, "arch": "resnet10-basic+gem3+linear",
                              "resize": TINY_RESIZE, "dims": DIMS, "file": TORCHSCRIPT,
                              "sha256": sha256_file(out / TORCHSCRIPT)})
    return out


# ------------------------------------------------------------------------------- real weights

def resolve_url(spec: str) -> str:
    """A released model name (`sscd_disc_mixup`), an http(s)/file URL, or a local path → a URL."""
    if spec in RELEASED:
        return RELEASED[spec][0]
    scheme = urlparse(spec).scheme
    if scheme in ("http", "https", "file"):
        return spec
    p = Path(spec).expanduser()
    if scheme == "" and p.is_file():
        return p.resolve().as_uri()
    raise ValueError(f"SSCD spec {spec!r} is neither a released model ({sorted(RELEASED)}), "
                     "an http(s)/file URL nor an existing file")


def download_sscd(url: str, out_dir: str | Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download a TorchScript SSCD model once into `out_dir` and record its sha256 in `sscd.json`.

    `url` may also be a released name or a local path (see `resolve_url`). With `sha256` given, a file
    whose hash differs is deleted and refused.
    """
    import torch

    url = resolve_url(url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / TORCHSCRIPT
    torch.hub.download_url_to_file(url, str(dst), progress=progress)
    digest = sha256_file(dst)
    if sha256 and digest != sha256.lower():
        dst.unlink()
        raise ValueError(f"sha256 mismatch for {url}: got {digest}, expected {sha256}")
    name = Path(urlparse(url).path).name.removesuffix(".torchscript.pt")
    dims = RELEASED[name][1] if name in RELEASED else DIMS
    write_json(out / PRESET, {"kind": "url", "url": url, "name": name, "resize": DEFAULT_RESIZE,
                              "dims": dims, "file": TORCHSCRIPT, "sha256": digest})
    return out


# ------------------------------------------------------------------------------------ loading

def find_torchscript(model_dir: str | Path) -> Path:
    """The TorchScript file of a model folder: `sscd.torchscript.pt`, else its only `*.pt` file."""
    d = Path(model_dir)
    if d.is_file():
        return d
    if (d / TORCHSCRIPT).is_file():
        return d / TORCHSCRIPT
    cands = sorted(d.glob("*.pt")) + sorted(d.glob("*.pth"))
    if len(cands) != 1:
        raise FileNotFoundError(f"{d}: expected {TORCHSCRIPT} or exactly one *.pt file, found "
                                f"{[c.name for c in cands]}")
    return cands[0]


def read_preset(model_dir: str | Path) -> dict:
    """`sscd.json` of a model folder, with defaults (resize 288, 512-d) for a bare TorchScript file."""
    d = Path(model_dir)
    preset = {"resize": DEFAULT_RESIZE, "dims": DIMS}
    if d.is_dir() and (d / PRESET).is_file():
        preset.update(json.loads((d / PRESET).read_text()))
    return preset


def fingerprint(model_dir: str | Path) -> str:
    """sha256 of the TorchScript file (recorded next to descriptors so consumers can check them)."""
    return sha256_file(find_torchscript(model_dir))


def load_sscd(model_dir: str | Path, device: str = "cpu"):
    """torch.jit.load the folder's TorchScript model, in eval mode on `device`."""
    import torch

    path = find_torchscript(model_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # "torch.jit.load is deprecated"
            model = torch.jit.load(str(path), map_location=resolve_device(device))
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError for any bad archive
        raise ValueError(f"{path}: not a loadable TorchScript model ({e})") from None
    return model.eval()


# ----------------------------------------------------------------------------- preprocessing

def target_size(w: int, h: int, resize: int | Sequence[int]) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Crop box and output (W, H) for an image of size (w, h).

    `resize` = (H, W): plain resize to that size (SSCD's 320×320 preset), no crop.
    `resize` = s: short side → s (SSCD's 288 preset). So that images of different aspect ratios can
    share a batch, the long side is rounded to a multiple of SIZE_STEP (≤ SIZE_STEP/2 px, ≤ 3% aspect
    change at s = 288), and aspect ratios beyond MAX_ASPECT are centre-cropped to it first. The whole
    image is kept otherwise (no square centre crop, which would hide copies of the cropped margins).
    """
    if not isinstance(resize, (int, np.integer)):
        H, W = (int(v) for v in resize)
        return (0, 0, w, h), (W, H)
    s = int(resize)
    box = (0, 0, w, h)
    if max(w, h) > MAX_ASPECT * min(w, h):
        if w > h:
            cw = int(round(MAX_ASPECT * h))
            x0 = (w - cw) // 2
            box, w = (x0, 0, x0 + cw, h), cw
        else:
            ch = int(round(MAX_ASPECT * w))
            y0 = (h - ch) // 2
            box, h = (0, y0, w, y0 + ch), ch
    long_ = max(w, h) * s / min(w, h)
    long_ = max(s, int(round(long_ / SIZE_STEP)) * SIZE_STEP)
    return box, ((long_, s) if w >= h else (s, long_))


def _to_tensor(img, box, size):
    from PIL import Image

    img = img.convert("RGB")
    if box != (0, 0, *img.size):
        img = img.crop(box)
    img = img.resize(size, Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0                         # (H, W, 3)
    a = (a - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return a.transpose(2, 0, 1)                                             # (3, H, W)


def descriptors(model, pils: Sequence, resize: int | Sequence[int] = DEFAULT_RESIZE, batch_size: int = 32,
                device: str = "cpu") -> np.ndarray:
    """SSCD descriptors of PIL images: float32 (N, D), L2-normalised, in input order.

    Images are grouped by their preprocessed shape (see `target_size`) and run in batches of
    ≤ `batch_size` per shape; SSCD itself evaluates one image at a time at short side 288.
    """
    import torch

    n = len(pils)
    if n == 0:
        return np.zeros((0, DIMS), np.float32)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    dev = resolve_device(device)
    plans = [target_size(*im.size, resize) for im in pils]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (_, size) in enumerate(plans):
        buckets.setdefault(size, []).append(i)
    out: np.ndarray | None = None
    with torch.inference_mode():
        for size in sorted(buckets):
            idx = buckets[size]
            for b in range(0, len(idx), batch_size):
                part = idx[b:b + batch_size]
                x = torch.from_numpy(np.stack([_to_tensor(pils[i], *plans[i]) for i in part])).to(dev)
                y = model(x).float().cpu().numpy()
                if out is None:
                    out = np.zeros((n, y.shape[1]), np.float32)
                out[part] = y
    # the model normalises already; renormalise in float32 so norms are 1 to float precision
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


class ChunkDescriptors:
    """`pas.engine.map_shards` work: (keys, descriptors) of one `pas.data.chunks` item.

    Pickles without the model: each Ray actor loads SSCD from `model_dir` once, on its own device;
    locally the already loaded `model` is used. The item → batches plan is the same on every engine,
    so the descriptors are byte-identical.
    """

    def __init__(self, model_dir: str | Path, resize, batch_size: int, device: str, max_side: int | None = None,
                 model=None):
        self.model_dir, self.resize, self.batch_size = str(model_dir), resize, batch_size
        self.device, self.max_side, self.model = device, max_side, model

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None}

    def __call__(self):
        # "auto" is resolved here, where the work runs: a Ray actor on a GPU node, not the driver
        self.device = resolve_device(self.device)
        if self.model is None:
            self.model = load_sscd(self.model_dir, device=self.device)
        return self.run

    def run(self, item: tuple) -> tuple[list[str], np.ndarray]:
        from pas.data.chunks import load_chunk

        keys, pils = [], []
        for key, img in load_chunk(item, self.max_side):
            keys.append(key)
            pils.append(img)
        return keys, descriptors(self.model, pils, resize=self.resize, batch_size=self.batch_size,
                                 device=self.device)
