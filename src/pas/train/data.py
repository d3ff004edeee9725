"""Streaming the final dataset's shards into two augmented views per image (no per-image files).

The pipeline is webdataset's: shard list → (per worker) tar members → shuffle buffer → decode → views.
Every random choice of an epoch is drawn from generators seeded by (seed, epoch): the shard order, the
shuffle buffer and the augmentations. An epoch is therefore a pure function of (seed, epoch, shards),
which is what lets a resumed run reproduce the uninterrupted one exactly.
"""

from __future__ import annotations

import random
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pas.io.shards import list_shards


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, epoch, stream), independent across epochs and streams."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators (torchvision/lightly transforms draw from them)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_samples(shard_dir: str | Path) -> int:
    """Number of samples in a shard directory: index.parquet rows, else JSON members of the tars."""
    shard_dir = Path(shard_dir)
    index = shard_dir / "index.parquet"
    if index.is_file():
        import pyarrow.parquet as pq

        return pq.read_metadata(index).num_rows
    n = 0
    for shard in list_shards(shard_dir):
        with tarfile.open(shard) as tar:
            n += sum(1 for m in tar if m.isfile() and m.name.endswith(".json"))
    return n


def two_view_transform(image_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.08):
    """BYOL's asymmetric augmentations, as used by MoCo v3 (arXiv:2104.02057 §4) and NNCLR (arXiv:2104.14548 §4).

    View 1: crop, flip, colour jitter (p=0.8), grayscale (0.2), blur (1.0); view 2: blur 0.1, solarize 0.2.
    Returns a callable PIL image -> [view1, view2] tensors normalised with the backbone's mean/std.
    """
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    norm = {"mean": list(mean), "std": list(std)}
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=image_size, min_scale=min_scale, normalize=norm),
        view_2_transform=BYOLView2Transform(input_size=image_size, min_scale=min_scale, normalize=norm),
    )


def _decode_views(transform: Callable):
    from pas.io.shards import decode_image

    def fn(sample: dict):
        ext = next(e for e in ("jpg", "jpeg", "png") if e in sample)
        v1, v2 = transform(decode_image(sample[ext]))
        return v1, v2

    return fn


def ssl_loader(shard_dir: str | Path, transform: Callable, batch_size: int, seed: int, epoch: int,
               shuffle_buffer: int = 1000, num_workers: int = 0):
    """A DataLoader over `shard_dir` for one epoch: batches of (view1, view2), each (B, 3, H, W).

    Drops the last partial batch (contrastive losses and BatchNorm heads need full batches).
    Shards are split across workers; with more workers than shards the extra workers stay idle.
    """
    import torch
    import webdataset as wds

    shards = [str(p) for p in list_shards(shard_dir)]
    if not shards:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards to pretrain on")
    random.Random(epoch_seed(seed, epoch, 1)).shuffle(shards)
    stages = [wds.SimpleShardList(shards), wds.split_by_worker, wds.tarfile_to_samples()]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                                  rng=random.Random(epoch_seed(seed, epoch, 2))))
    stages.append(wds.map(_decode_views(transform)))
    dataset = wds.DataPipeline(*stages)
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, 3))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True, num_workers=num_workers,
                                       generator=gen, persistent_workers=False)
