"""The streaming loader: every image once per epoch, order a pure function of (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pas.train.data import count_samples, epoch_seed, ssl_loader, two_view_transform
from tests.train_helpers import synthetic_shards


def _id_transform(img):
    """Identity 'augmentation': the sample's pixel sum identifies it in the batch."""
    t = torch.as_tensor(np.asarray(img, dtype=np.float32)).sum().reshape(1)
    return [t, t + 0.5]


def _epoch(shards, seed, epoch, batch=4, buffer=8):
    out = []
    for x0, x1 in ssl_loader(shards, _id_transform, batch, seed, epoch, shuffle_buffer=buffer):
        assert torch.equal(x1, x0 + 0.5)   # the two views stay paired
        out += x0.flatten().tolist()
    return out


def test_each_epoch_covers_the_dataset_in_a_seeded_order(tmp_path):
    shards = synthetic_shards(tmp_path / "ds", 24, maxcount=7)    # 4 shards, uneven
    everything = sorted(_epoch(shards, 0, 0, batch=1, buffer=1))
    assert len(everything) == 24 and len(set(everything)) == 24
    e0, e0_again, e1, other_seed = (_epoch(shards, 0, 0), _epoch(shards, 0, 0), _epoch(shards, 0, 1),
                                    _epoch(shards, 1, 0))
    assert e0 == e0_again                    # a resumed epoch sees the same order
    assert e0 != e1 and e0 != other_seed
    assert sorted(e0) == everything and sorted(e1) == everything   # 24 = 6 full batches: nothing lost


def test_drop_last_and_counts(tmp_path):
    shards = synthetic_shards(tmp_path / "ds", 10, maxcount=4, index=False)
    assert count_samples(shards) == 10                  # from the tars
    synthetic_shards(tmp_path / "ds2", 10)
    assert count_samples(tmp_path / "ds2") == 10        # from index.parquet
    assert len(_epoch(shards, 0, 0, batch=4)) == 8      # the partial batch is dropped
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        ssl_loader(tmp_path, _id_transform, 4, 0, 0)


def test_two_views_shapes_and_normalisation(tmp_path):
    from PIL import Image

    tf = two_view_transform(32, [0.5] * 3, [0.5] * 3)
    v1, v2 = tf(Image.new("RGB", (100, 60), (255, 255, 255)))
    assert v1.shape == v2.shape == (3, 32, 32)
    assert v1.max() <= 1.0 + 1e-6 and v1.min() >= -1.0 - 1e-6


def test_epoch_seeds_are_distinct():
    seeds = {epoch_seed(s, e, k) for s in range(3) for e in range(10) for k in range(4)}
    assert len(seeds) == 120 and all(0 <= x < 2**63 for x in seeds)


def test_workers_split_shards_and_stay_deterministic(tmp_path):
    shards = synthetic_shards(tmp_path / "ds", 24, maxcount=6)    # 4 shards over 2 workers

    def run():
        return [v for x0, _ in ssl_loader(shards, _id_transform, 3, 0, 0, shuffle_buffer=4, num_workers=2)
                for v in x0.flatten().tolist()]

    a, b = run(), run()
    assert a == b and len(a) == 24 and sorted(a) == sorted(_epoch(shards, 0, 0, batch=1, buffer=1))
