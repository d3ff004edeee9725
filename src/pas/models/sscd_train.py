"""The offline SSCD: a small copy-detection descriptor trained on the pool with SSCD's recipe.

SSCD (Pizzi et al., CVPR 2022) trains a descriptor so that an image and its edited copies map close
together and different images far apart: "a contrastive self-supervised loss (InfoNCE) on strong
augmentations" plus "an entropy regularization term [KoLeo] that promotes consistent separation
between descriptor vectors". We follow it on the pool's images: two copy-style views per image (crops,
resizes, flips, colour jitter, greyscale, blur, patch overlays, JPEG re-encodes), InfoNCE over the
batch plus λ_KoLeo·KoLeo (lightly's NTXentLoss and KoLeoLoss); optionally view 1 is the unedited image
(dedup compares a copy with its original) and the descriptors are PCA-whitened on the pool (SSCD's
evaluation normalises scores against background images). The trunk is a narrow ResNet of the same
shape as `pas.models.sscd`'s (BasicBlocks → GeM p=3 → Linear → L2 norm, then the whitening Linear →
L2 norm), scripted to TorchScript like the released models, so `load_sscd` / `descriptors` / dedup /
leakage use it unchanged.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from pas.hashing import sha256_file
from pas.jsonio import write_json
from pas.models.files import seed_everything
from pas.models.specs import SscdTrainSpec
from pas.models.sscd import PRESET, TORCHSCRIPT, _script_in_child, _write_reproducible
from pas.train.schedule import adamw, lr_factor

log = logging.getLogger(__name__)


def _small_module(widths, dims: int):
    """The trained trunk: stem → one BasicBlock per stage at `widths` → GeM(3) → Linear → L2 → whitening
    Linear → L2."""
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    from pas.models.sscd import _tiny_classes

    GeM, _ = _tiny_classes()
    # ResNet's stem (stride-2 conv + max pool): the blocks then run at 1/4 resolution
    layers = [nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    c = widths[0]
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None if stride == 1 and c == w else nn.Sequential(nn.Conv2d(c, w, 1, stride, bias=False),
                                                                 nn.BatchNorm2d(w))
        layers.append(BasicBlock(c, w, stride, down))
        c = w
    whitening = nn.Linear(dims, dims)
    with torch.no_grad():                         # identity unless train_sscd fits it (spec.whiten > 0)
        whitening.weight.copy_(torch.eye(dims))
        whitening.bias.zero_()
    return _small_class()(nn.Sequential(*layers), nn.Sequential(GeM(3.0), nn.Linear(c, dims)), whitening)


def _small_class():
    """The SmallSSCD class, created once per process (TorchScript caches compiled types by class, as
    `pas.models.sscd._tiny_classes` explains), and only once torch is needed."""
    if "SmallSSCD" in _CLASSES:
        return _CLASSES["SmallSSCD"]
    from torch import nn

    class SmallSSCD(nn.Module):
        """SSCD-shaped: trunk → GeM(p=3) → Linear → L2 normalise, then centring/whitening → L2 normalise
        (SSCD's descriptor post-processing, learnt on the pool)."""

        def __init__(self, backbone, embeddings, whitening):
            super().__init__()
            self.backbone, self.embeddings, self.whitening = backbone, embeddings, whitening

        def forward(self, x):
            z = nn.functional.normalize(self.embeddings(self.backbone(x)), p=2.0, dim=1)
            return nn.functional.normalize(self.whitening(z), p=2.0, dim=1)

    SmallSSCD.__module__, SmallSSCD.__qualname__ = __name__, "SmallSSCD"
    _CLASSES["SmallSSCD"] = SmallSSCD
    return SmallSSCD


_CLASSES: dict = {}


def augment_batch(x, gen, size: int, min_area: float = 0.25):
    """Copy-style views of a uint8 batch (B, S, S, 3) → normalised float (B, 3, size, size), batched
    tensor ops (PIL per view was the bottleneck): random resized crop (area min_area–1), flip, brightness /
    contrast / saturation jitter, greyscale, box blur, a coloured patch overlay, JPEG re-encode."""
    import io

    import torch
    import torch.nn.functional as F
    from PIL import Image

    from pas.models.sscd import IMAGENET_MEAN, IMAGENET_STD

    b, s = x.shape[0], x.shape[1]
    src = x.permute(0, 3, 1, 2).float().div_(255.0)
    u = lambda *shape: torch.rand(*shape, generator=gen)          # noqa: E731
    out = torch.empty(b, 3, size, size)
    area, logr = min_area + u(b) * (1 - min_area), (u(b) - 0.5) * 2 * math.log(4 / 3)
    for i in range(b):
        cw = int(min(s, max(8, round(s * math.sqrt(float(area[i]) * math.exp(float(logr[i])))))))
        ch = int(min(s, max(8, round(s * math.sqrt(float(area[i]) / math.exp(float(logr[i])))))))
        y0 = int(u(1) * (s - ch + 1))
        x0 = int(u(1) * (s - cw + 1))
        out[i] = F.interpolate(src[i:i + 1, :, y0:y0 + ch, x0:x0 + cw], size=(size, size), mode="bilinear",
                               align_corners=False, antialias=True)[0]
    flip = u(b) < 0.5
    out[flip] = out[flip].flip(-1)
    jitter = (u(b) < 0.8).float().view(b, 1, 1, 1)
    f = lambda: 1 + jitter * (u(b).view(b, 1, 1, 1) * 0.8 - 0.4)  # noqa: E731 - factors 0.6..1.4
    out = out * f()
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * f() + mean
    grey = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
    out = grey + (out - grey) * f()
    to_grey = u(b) < 0.2
    out[to_grey] = grey[to_grey].expand(-1, 3, -1, -1)
    blur = u(b) < 0.3
    if blur.any():
        out[blur] = F.avg_pool2d(F.pad(out[blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    for i in torch.nonzero(u(b) < 0.3).flatten().tolist():       # overlay: a coloured patch
        p = int(size // 8 + u(1) * (size // 3 - size // 8))
        py, px = int(u(1) * (size - p)), int(u(1) * (size - p))
        out[i, :, py:py + p, px:px + p] = u(3).view(3, 1, 1)
    out = out.clamp_(0, 1)
    for i in torch.nonzero(u(b) < 0.3).flatten().tolist():       # JPEG re-encode
        a = (out[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=int(20 + u(1) * 75))
        buf.seek(0)
        out[i] = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    sd = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (out - m) / sd


def plain_batch(x, size: int):
    """A uint8 batch (B, S, S, 3) resized to `size` without edits, normalised as `descriptors` does: the
    originals, as inference sees them (antialiased, like PIL's downscaling)."""
    import torch
    import torch.nn.functional as F

    from pas.models.sscd import IMAGENET_MEAN, IMAGENET_STD

    out = F.interpolate(x.permute(0, 3, 1, 2).float().div_(255.0), size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    sd = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (out - m) / sd


def whitening_matrix(z: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening of descriptors `z` (N, D): W = diag(λ + shrink·mean λ)^-½ Vᵀ, b = −W μ, so that
    W z + b is centred with (shrunk) unit variance along every principal axis. The common component
    a small trunk gives every image (the random-init SSCD's: benchmarks/RESULTS-dedup.md) is removed by
    the centring; the shrinkage keeps near-empty directions from amplifying noise."""
    z = z.astype(np.float64)
    mu = z.mean(0)
    ev, vec = np.linalg.eigh(np.cov(z - mu, rowvar=False))
    ev = np.clip(ev, 0.0, None)
    w = (vec / np.sqrt(ev + shrink * ev.mean())).T
    return w.astype(np.float32), (-w @ mu).astype(np.float32)


def train_on_pool(spec: dict, params, out_dir: str | Path) -> dict:
    """`models.sscd` with `kind: trained` (`spec`), trained on the pool of `params` (params.yaml)."""
    from pas.data.pool import PoolParams
    from pas.models.pool_pairs import load_pool_pairs
    from pas.params import build

    s = SscdTrainSpec(**{k: v for k, v in spec.items() if k != "kind"})
    return train_sscd(load_pool_pairs(build(PoolParams, params, "pool"), s.train_size), s, out_dir)


def train_sscd(pairs, spec: SscdTrainSpec, out_dir: str | Path) -> dict:
    """Train on the pool crops of `pairs` (`PoolPairs`), script and save `out_dir` like `build_tiny_sscd`."""
    import torch
    from lightly.loss import KoLeoLoss, NTXentLoss

    torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    model = _small_module(spec.widths, spec.dims)
    rng = np.random.default_rng(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = adamw(model.parameters(), spec.lr, spec.weight_decay)
    info_nce, koleo = NTXentLoss(temperature=spec.temperature), KoLeoLoss()
    n = len(pairs.keys)
    bs = min(spec.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    images = torch.from_numpy(pairs.images)
    losses, step = [], 0
    model.train()
    for epoch in range(spec.epochs):
        perm = rng.permutation(n)
        run = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            lr = spec.lr * lr_factor(step, steps_per_epoch, spec.epochs, 0.5, "cosine")
            for g in opt.param_groups:
                g["lr"] = lr
            v1 = augment_batch(images[idx], gen, spec.resize, spec.min_area)
            v2 = augment_batch(images[idx], gen, spec.resize, spec.min_area)
            if spec.original_view > 0:
                keep = torch.rand(len(idx), generator=gen) < spec.original_view
                if keep.any():
                    v1[keep] = plain_batch(images[idx][keep], spec.resize)
            z1, z2 = model(v1), model(v2)
            loss = info_nce(z1, z2)
            if spec.koleo_weight > 0:
                loss = loss + spec.koleo_weight * koleo(torch.cat([z1, z2]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += loss.item()
            step += 1
        losses.append(run / steps_per_epoch)
        log.info("sscd: epoch %d/%d loss %.4f", epoch + 1, spec.epochs, losses[-1])
    model.eval()
    if spec.whiten > 0:
        with torch.no_grad():
            z = torch.cat([model(plain_batch(images[i:i + 512], spec.resize)) for i in range(0, n, 512)])
            w, bias = whitening_matrix(z.numpy(), spec.whiten)
            model.whitening.weight.copy_(torch.from_numpy(w))
            model.whitening.bias.copy_(torch.from_numpy(bias))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = out / ".trained_state.pt"
    torch.save(model.state_dict(), state)
    try:
        _script_in_child(_script_here, str(out.resolve()), str(state.resolve()), list(spec.widths), int(spec.dims),
                         what="scripting the trained SSCD model")
    finally:
        state.unlink(missing_ok=True)
    write_json(out / PRESET, {"kind": "trained", "seed": spec.seed, "arch": f"basic{list(spec.widths)}+gem3+linear",
                              "resize": spec.resize, "dims": spec.dims, "file": TORCHSCRIPT,
                              "sha256": sha256_file(out / TORCHSCRIPT)})
    return {"n_images": n, "epochs": spec.epochs, "loss_first_epoch": round(losses[0], 6),
            "loss_last_epoch": round(losses[-1], 6)}


def _script_here(out: str, state: str, widths: list, dims: int) -> None:
    import torch

    model = _small_module(widths, dims).eval()
    model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
    with torch.no_grad():
        scripted = torch.jit.script(model)
    _write_reproducible(scripted, Path(out) / TORCHSCRIPT)
