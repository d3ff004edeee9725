"""Small builders shared by the pretrain/evaluate/evalsets tests: tiny backbones, shards, image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from pas.io.manifest import write_parquet
from pas.io.shards import ShardWriter, encode_image, make_key

TINY_VIT = {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "depth": 2}, "seed": 0}
TINY_PRETRAIN = {"method": "mocov3", "image_size": 32, "epochs": 2, "batch_size": 8, "lr": 1e-3,
                 "warmup_epochs": 1, "hidden_dim": 64, "out_dim": 32, "pred_hidden_dim": 64, "min_scale": 0.3,
                 "shuffle_buffer": 16, "threads": 1}


def tiny_backbone_init(out: Path, spec: dict | None = None) -> Path:
    from pas.models.backbone import write_backbone_init

    return write_backbone_init(spec or TINY_VIT, out)


def blob_image(rng: np.random.Generator, color, size: int = 40) -> Image.Image:
    """A coloured disc on noise: enough structure for augmentations and a class signal for kNN."""
    a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
    a[mask] = color
    return Image.fromarray(a)


COLORS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30)]


def synthetic_shards(out: Path, n: int, seed: int = 0, maxcount: int = 10_000, index: bool = True) -> Path:
    """`n` images in shards (the `data/dataset` contract: key.jpg + key.json, index.parquet)."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out, maxcount=maxcount) as w:
        for i in range(n):
            w.write(make_key("p", seed, i), encode_image(blob_image(rng, COLORS[i % len(COLORS)])),
                    {"source": "real", "label": i % len(COLORS)})
    if index:
        write_parquet(pd.DataFrame(w.rows), out / "index.parquet")
    return out


def image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """`root/<class>/img_<i>.png` with a class colour per folder."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(sorted(per_class.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            blob_image(rng, COLORS[c % len(COLORS)]).save(root / name / f"img_{i:03d}.png")
    return root


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({"seed": 0, **sections}, sort_keys=True))
    return path
