"""(image, alt text) pairs of the image pool: the training data of the offline CLIP and SSCD.

The offline profile has no pretrained image model, so the `models` stage trains small ones on the pool
itself, the way web-scale CLIPs learn from (image, alt text) pairs. Alt text:
  * webdataset pools: the sample's `caption` (img2dataset writes it);
  * image folders: the words of the folder path and the file name, without author names and
    numbering — openclipart names its files `<subject>_<author>_<nn>.png`.
The pool categories (folders) are also the evaluation labels of `domain_precision`; curation stages
never read them (tests/test_domain_precision.py shuffles them and checks that the outputs do not move).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[a-z]+")
# filler of openclipart file names that says nothing about the picture
STOP_WORDS = frozenset({"bw", "png", "svg", "clipart", "clip", "art", "and", "the", "of", "with", "a", "an",
                        "by", "for", "on", "in", "r", "s", "v", "x"})


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOP_WORDS]


def author_words(paths: Sequence[str], min_categories: int = 3) -> frozenset[str]:
    """File-name words that occur under at least `min_categories` top-level folders and are no folder
    name: in openclipart these are author names ("ganson", "architetto", "francesco"), which an
    artist spreads over many categories; subject words stay within a few."""
    tops: dict[str, set[str]] = defaultdict(set)
    folder_words: set[str] = set()
    for rel in paths:
        parts = PurePosixPath(rel).parts
        for part in parts[:-1]:
            folder_words.update(_words(part))
        for w in set(_words(PurePosixPath(rel).stem)):
            tops[w].add(parts[0] if len(parts) > 1 else "")
    return frozenset(w for w, cats in tops.items() if len(cats) >= min_categories and w not in folder_words)


def alt_text(rel: str, authors: frozenset[str]) -> str:
    """`food/fruit/apple_bitten_dan_gerhard_01.png` → "food fruit apple bitten" (authors removed)."""
    path = PurePosixPath(rel)
    folders = [w for part in path.parts[:-1] for w in _words(part.replace("_", " "))]
    name = [w for w in _words(path.stem.replace("_", " ")) if w not in authors]
    return " ".join(dict.fromkeys(folders + name))   # each word once, first occurrence kept


@dataclass
class PoolPairs:
    """The pool decoded once at training size: uint8 (N, S, S, 3) square crops and their alt texts."""

    keys: list[str]
    images: np.ndarray
    texts: list[str]


def square_crop(img, size: int):
    """Shortest side → `size` (bicubic), centre crop: open_clip's eval preprocessing ("shortest")."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    x0, y0 = (w - size) // 2, (h - size) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


def load_pool_pairs(p, size: int) -> PoolPairs:
    """Decode the pool (`pas.data.pool.PoolParams` `p`) as the pool stage does (same files, same skips)
    into `size`² crops + alt text."""
    from pas.data.pool import iter_pool

    skipped: list[dict] = []
    keys, crops, paths, captions = [], [], [], []
    for it in iter_pool(p, skipped):
        keys.append(it.key)
        crops.append(np.asarray(square_crop(it.image, size), dtype=np.uint8))
        paths.append(it.path)
        captions.append(it.caption)
    if not keys:
        raise ValueError(f"pool.source={p.source!r}: no decodable images to train the offline models on")
    authors = author_words(paths)
    texts = [c if c else alt_text(path, authors) for c, path in zip(captions, paths)]
    return PoolPairs(keys, np.stack(crops), texts)
