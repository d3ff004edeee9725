"""Streaming the final dataset's shards into two augmented views per image (no per-image files).

The pipeline is webdataset's: shard list → (per worker) tar members → shuffle buffer → decode → views.
Every random choice of an epoch is drawn from generators seeded by (seed, epoch): the shard order, the
shuffle buffer and the augmentations. An epoch is therefore a pure function of (seed, epoch, shards),
which is what lets a resumed run reproduce the uninterrupted one exactly.

With K > 1 data slots (processes × accumulation micro-batches, see `pas.train.distributed`), the epoch's
shuffled shard list is dealt round-robin to the slots (each image is seen at most once per epoch across
them) and every slot has its own generators, seeded by (seed, epoch, slot): a slot's micro-batches do not
depend on which process runs it or which other slots share that process.
"""

from __future__ import annotations

import random
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pas.io.shards import list_shards
from pas.models.files import seed_everything


def epoch_seed(seed: int, epoch: int, stream: int = 0, slot: int | None = None) -> int:
    """A 63-bit seed for (seed, epoch, stream[, data slot]), independent across epochs, streams and slots."""
    entropy = [seed, epoch, stream] + ([] if slot is None else [slot + 1])   # SeedSequence ignores trailing 0s
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def rng_state() -> dict:
    """The python, numpy and torch global generator states (what `seed_everything` seeds)."""
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class OwnRNG:
    """Runs a function on its own global-generator states, swapped in around each call.

    The augmentations draw from the global python/numpy/torch generators; with several data slots in one
    process (accumulation) each slot gets its own states, so its views are those it would get alone."""

    def __init__(self, seed: int):
        outer = rng_state()
        seed_everything(seed)
        self.state = rng_state()
        set_rng_state(outer)

    def __call__(self, fn: Callable, *args):
        outer = rng_state()
        set_rng_state(self.state)
        try:
            return fn(*args)
        finally:
            self.state = rng_state()
            set_rng_state(outer)


def count_samples(shard_dir: str | Path) -> int:
    """Number of samples in a shard directory: index.parquet rows, else JSON members of the tars."""
    shard_dir = Path(shard_dir)
    index = shard_dir / "index.parquet"
    if index.is_file():
        import pyarrow.parquet as pq

        return pq.read_metadata(index).num_rows
    return sum(shard_sizes(shard_dir).values())


def shard_sizes(shard_dir: str | Path) -> dict[str, int]:
    """Samples per shard (by file name): from index.parquet's `shard` column, else the JSON members."""
    shard_dir = Path(shard_dir)
    shards = list_shards(shard_dir)
    index = shard_dir / "index.parquet"
    if index.is_file():
        import pyarrow.parquet as pq

        if "shard" in pq.read_schema(index).names:
            counts = pq.read_table(index, columns=["shard"]).column("shard").to_pandas().value_counts()
            return {p.name: int(counts.get(p.name, 0)) for p in shards}
    sizes = {}
    for p in shards:
        with tarfile.open(p) as tar:
            sizes[p.name] = sum(1 for m in tar if m.isfile() and m.name.endswith(".json"))
    return sizes


def slot_shards(shards: Sequence, seed: int, epoch: int, slot: int = 0, n_slots: int = 1) -> list:
    """The shards data slot `slot` of `n_slots` streams in `epoch`: the epoch's shuffled list, dealt round-robin."""
    shards = list(shards)
    random.Random(epoch_seed(seed, epoch, 1)).shuffle(shards)
    return shards[slot::n_slots]


def steps_per_epoch(shard_dir: str | Path, batch_size: int, seed: int, epochs: int, n_slots: int = 1,
                    num_workers: int = 0) -> int:
    """Full batches every epoch yields: the fewest over epochs and data slots (one schedule for all epochs).

    A DataLoader worker batches its own shards (`split_by_worker`), dropping its last partial batch, so a
    slot yields Σ_workers ⌊n_w / batch_size⌋ batches. One slot read in one process: ⌊n / batch_size⌋."""
    if n_slots == 1 and num_workers <= 1:
        return count_samples(shard_dir) // batch_size
    sizes = shard_sizes(shard_dir)
    names = sorted(sizes)
    workers = max(1, num_workers)
    steps = []
    for epoch in range(epochs):
        for slot in range(n_slots):
            mine = slot_shards(names, seed, epoch, slot, n_slots)
            steps.append(sum(sum(sizes[s] for s in mine[w::workers]) // batch_size for w in range(workers)))
    return min(steps, default=0)


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


def _decode_views(transform: Callable, rng: OwnRNG | None = None):
    from pas.io.shards import decode_image

    def views(data: bytes):
        v1, v2 = transform(decode_image(data))
        return v1, v2

    def fn(sample: dict):
        ext = next(e for e in ("jpg", "jpeg", "png") if e in sample)
        return views(sample[ext]) if rng is None else rng(views, sample[ext])

    return fn


def ssl_loader(shard_dir: str | Path, transform: Callable, batch_size: int, seed: int, epoch: int,
               shuffle_buffer: int = 1000, num_workers: int = 0, slot: int = 0, n_slots: int = 1,
               pin_memory: bool = False):
    """A DataLoader over `shard_dir` for one epoch: batches of (view1, view2), each (B, 3, H, W).

    Drops the last partial batch (contrastive losses and BatchNorm heads need full batches).
    Shards are split across workers; with more workers than shards the extra workers stay idle.
    With `n_slots` > 1 it streams data slot `slot`'s shards only, on that slot's own generators.
    """
    import torch
    import webdataset as wds

    shards = [str(p) for p in list_shards(shard_dir)]
    if not shards:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards to pretrain on")
    one = n_slots == 1   # one slot: the generators of the whole run (the single-process path, unchanged)
    shards = slot_shards(shards, seed, epoch, slot, n_slots)
    stages = [wds.SimpleShardList(shards), wds.split_by_worker, wds.tarfile_to_samples()]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                                  rng=random.Random(epoch_seed(seed, epoch, 2, None if one else slot))))
    # workers > 0 seed their own generators from `gen`; in-process slots need theirs swapped in per sample
    rng = None if one or num_workers > 0 else OwnRNG(epoch_seed(seed, epoch, 0, slot))
    stages.append(wds.map(_decode_views(transform, rng)))
    dataset = wds.DataPipeline(*stages)
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, 3, None if one else slot))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True, num_workers=num_workers,
                                       generator=gen, persistent_workers=False, pin_memory=pin_memory)
