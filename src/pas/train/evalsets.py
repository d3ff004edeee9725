"""Evaluation sets: a fixed, seeded train/test split written once as shards (paper App. D.3).

Each eval set of `params.yaml` (`eval.sets`) is an image folder (`<path>/<class>/**/image`), webdataset
shards with a label in their JSON, or torchvision's Food-101 already on disk. It is written once to
`<out>/<name>/{train,test}/` (shards + index.parquet) and `<out>/<name>/classes.json`; `leakage` compares the
curated dataset to `test/`, `evaluate` fits kNN and the linear probe on `train/` and scores `test/`.
The split depends only on the set's spec and `eval.split_seed`, not on the run's `seed`, so experiments
with different seeds are scored on the same test images.
"""

from __future__ import annotations

import io
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pas.data.images import BadImage, load_rgb
from pas.params import ParamsError, build, check_choice, check_range, check_seed

log = logging.getLogger(__name__)

KINDS = ("imagefolder", "wds", "food101")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class EvalSetSpec:
    """One evaluation dataset (an item of `eval.sets`)."""

    name: str                          # output folder name, [A-Za-z0-9_-]
    kind: str                          # imagefolder | wds | food101
    path: str                          # folder of class folders / folder of shards / Food-101 root
    classes: tuple[str, ...] | None = None  # subset of class names (None: every class with >= min_per_class)
    test_fraction: float = 0.3         # share of each class held out for test (ignored by food101)
    n_test: int | None = None          # fixed test images per class instead of test_fraction
    min_per_class: int = 20            # classes with fewer images are left out (and counted)
    max_per_class: int | None = None   # seeded cap per class and split (None: all)
    label_key: str = "label"           # wds: JSON field holding the class (int or name)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ParamsError(f"eval.sets[{self.name}].name={self.name!r} must be [A-Za-z0-9_-]+")
        check_choice(f"eval.sets[{self.name}].kind", self.kind, KINDS)
        check_range(f"eval.sets[{self.name}].test_fraction", self.test_fraction, 0.0, 1.0)
        if self.n_test is not None:
            check_range(f"eval.sets[{self.name}].n_test", self.n_test, 1, None, lo_open=False)
        check_range(f"eval.sets[{self.name}].min_per_class", self.min_per_class, 2, None, lo_open=False)
        if self.n_test is not None and self.n_test >= self.min_per_class:
            raise ParamsError(f"eval.sets[{self.name}].n_test={self.n_test} must be < min_per_class="
                              f"{self.min_per_class} (every class needs a training image)")
        if self.max_per_class is not None:
            check_range(f"eval.sets[{self.name}].max_per_class", self.max_per_class, 1, None, lo_open=False)

    @classmethod
    def from_dict(cls, raw: dict) -> "EvalSetSpec":
        if not isinstance(raw, dict):
            raise ParamsError(f"sets: each item must be a mapping, got {raw!r}")
        raw = dict(raw)
        if isinstance(raw.get("classes"), list):
            raw["classes"] = tuple(str(c) for c in raw["classes"])
        where = f"eval.sets[{raw.get('name')}]"
        # build: unknown keys (with the nearest known one), missing keys, types, finite numbers
        return build(cls, {where: raw}, section=where)


def parse_sets(raw: list) -> tuple[EvalSetSpec, ...]:
    specs = tuple(EvalSetSpec.from_dict(r) for r in raw)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ParamsError(f"sets: duplicate eval set name {dup[0]!r}")
    return specs


@dataclass(frozen=True)
class EvalParams:
    """Section `eval` of params.yaml (+ top-level `seed` for the linear probe's init and batches).

    `sets`, `split_seed`, `max_side`, `max_pixels` shape the written eval sets (stage `evalsets`);
    the rest is how `evaluate` scores them.
    """

    sets: tuple[dict, ...] = ()            # eval sets, see pas.train.evalsets.EvalSetSpec
    split_seed: int = 0                    # train/test split seed, fixed across experiments
    max_side: int = 256                    # stored eval images: longer side <= max_side
    max_pixels: int = 50_000_000           # images larger than this (from the header) are skipped
    knn_k: int = 1                         # neighbours voting (paper: 1)
    knn_weighting: str = "uniform"         # uniform (majority) | dino (Σ exp(cos/T) per class)
    knn_temperature: float = 0.07          # T of dino weighting
    linear_epochs: int = 100               # paper: 100
    linear_optimizer: str = "auto"         # auto (ViT: adamw+cosine, CNN: sgd+steps 60/80%) | adamw | sgd
    linear_lr: float | None = None         # None: 1e-2 (adamw), 0.1 (sgd), on standardised features
    linear_weight_decay: float = 0.0
    linear_batch_size: int = 256
    batch_size: int = 128                  # feature extraction batch
    baseline_checkpoint: str | None = None  # None: random init of models/backbone_init; else weights file/folder
    device: str = "cpu"                    # cpu | cuda | auto
    threads: int = 0                       # torch CPU threads (0: torch default)
    seed: int = 0                          # top-level seed

    def __post_init__(self) -> None:
        parse_sets(list(self.sets))
        check_choice("knn_weighting", self.knn_weighting, ("uniform", "dino"))
        check_choice("linear_optimizer", self.linear_optimizer, ("auto", "adamw", "sgd"))
        check_choice("device", self.device, ("cpu", "cuda", "auto"))
        for name in ("knn_k", "linear_epochs", "linear_batch_size", "batch_size", "max_side", "max_pixels"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)
        check_range("knn_temperature", self.knn_temperature, 0.0, None)
        if self.linear_lr is not None:
            check_range("linear_lr", self.linear_lr, 0.0, None)
        check_range("linear_weight_decay", self.linear_weight_decay, 0.0, None, lo_open=False)
        check_range("threads", self.threads, 0, None, lo_open=False)
        check_seed("split_seed", self.split_seed)
        check_seed("seed", self.seed)

    @property
    def specs(self) -> tuple[EvalSetSpec, ...]:
        return parse_sets(list(self.sets))


@dataclass
class Item:
    """One source image of an eval set before splitting."""

    source_path: str              # file path, or "<shard>/<key>" for shards
    label_name: str
    split: str | None = None      # preset split (food101, pre-split shards)
    data: bytes | None = None     # image bytes when they come from shards


def _rng(split_seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([split_seed, *(zlib.crc32(p.encode()) for p in parts)])


def _list_imagefolder(spec: EvalSetSpec) -> list[Item]:
    root = Path(spec.path)
    if not root.is_dir():
        raise FileNotFoundError(f"eval set {spec.name!r}: image folder {root} not found")
    items = []
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cdir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                items.append(Item(str(f), cdir.name))
    return items


def _list_wds(spec: EvalSetSpec) -> list[Item]:
    from pas.io.shards import iter_samples, list_shards

    root = Path(spec.path)
    pre_split = all((root / s).is_dir() and list_shards(root / s) for s in SPLITS)
    parts = [(root / s, s) for s in SPLITS] if pre_split else [(root, None)]
    items = []
    for path, split in parts:
        if not list_shards(path):
            raise FileNotFoundError(f"eval set {spec.name!r}: no .tar shards in {path}")
        for s in iter_samples(path):
            if spec.label_key not in s.meta:
                raise ValueError(f"eval set {spec.name!r}: sample {s.key} in {s.shard} has no "
                                 f"{spec.label_key!r} field (set sets[{spec.name}].label_key)")
            items.append(Item(f"{s.shard}/{s.key}", str(s.meta[spec.label_key]), split, s.image))
    return items


def _list_food101(spec: EvalSetSpec) -> list[Item]:
    """Food-101 through torchvision (download=False: only when already on disk), official split."""
    try:
        from torchvision.datasets import Food101

        Food101(spec.path, split="test", download=False)   # checks the files are there
    except RuntimeError as e:
        raise FileNotFoundError(f"eval set {spec.name!r}: Food-101 not found under {spec.path} ({e}); "
                                "download it once with torchvision.datasets.Food101(root, download=True)") from None
    base = Path(spec.path) / "food-101"
    items = []
    for split in SPLITS:
        meta = json.loads((base / "meta" / f"{split}.json").read_text())
        for cls in sorted(meta):
            for rel in sorted(meta[cls]):
                items.append(Item(str(base / "images" / f"{rel}.jpg"), cls, split))
    return items


LISTERS = {"imagefolder": _list_imagefolder, "wds": _list_wds, "food101": _list_food101}


def split_items(spec: EvalSetSpec, items: list[Item], split_seed: int) -> tuple[dict[str, list[Item]], list[str], dict]:
    """Assign each item to train/test per class; returns (splits, class names, counters).

    Per class (sorted paths, seeded permutation): the first n_test go to test, the rest to train, with
    n_test = sets.n_test or round(test_fraction·n) clipped to [1, n−1]. Preset splits are kept.
    """
    by_class: dict[str, list[Item]] = {}
    for it in items:
        by_class.setdefault(it.label_name, []).append(it)
    stats = {"n_classes_found": len(by_class), "dropped_classes_small": 0, "dropped_classes_unlisted": 0}
    if spec.classes is not None:
        missing = sorted(set(spec.classes) - set(by_class))
        if missing:
            raise ValueError(f"eval set {spec.name!r}: classes {missing} not found in {spec.path} "
                             f"(found: {sorted(by_class)[:20]})")
        stats["dropped_classes_unlisted"] = len(set(by_class) - set(spec.classes))
        by_class = {c: by_class[c] for c in spec.classes}
    classes = []
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for cls in sorted(by_class):
        its = sorted(by_class[cls], key=lambda i: i.source_path)
        if len(its) < spec.min_per_class:
            stats["dropped_classes_small"] += 1
            continue
        classes.append(cls)
        if all(i.split is not None for i in its):
            for split in SPLITS:
                part = [i for i in its if i.split == split]
                if spec.max_per_class is not None and len(part) > spec.max_per_class:
                    idx = _rng(split_seed, spec.name, cls, split).permutation(len(part))[: spec.max_per_class]
                    part = [part[j] for j in sorted(idx)]
                out[split].extend(part)
            continue
        perm = _rng(split_seed, spec.name, cls).permutation(len(its))
        its = [its[j] for j in perm]
        if spec.max_per_class is not None:
            its = its[: spec.max_per_class]
        n = len(its)
        n_test = spec.n_test if spec.n_test is not None else round(spec.test_fraction * n)
        n_test = min(max(n_test, 1), n - 1)
        out["test"].extend(its[:n_test])
        out["train"].extend(its[n_test:])
    if not classes:
        raise ValueError(f"eval set {spec.name!r}: no class has >= {spec.min_per_class} images "
                         f"(sets[{spec.name}].min_per_class)")
    return out, classes, stats


def write_evalset(spec: EvalSetSpec, out_dir: str | Path, split_seed: int = 0, max_pixels: int = 50_000_000,
                  max_side: int | None = 256, progress: bool = True) -> dict:
    """List, split and write one eval set to `<out_dir>/<name>/`; returns its counters."""
    from tqdm import tqdm

    from pas.io.shards import ShardWriter, encode_image, make_key, write_index

    import pandas as pd

    items = LISTERS[spec.kind](spec)
    splits, classes, stats = split_items(spec, items, split_seed)
    label_of = {c: i for i, c in enumerate(classes)}
    root = Path(out_dir) / spec.name
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        keyed = sorted(((make_key("e", spec.name, it.source_path), it) for it in splits[split]),
                       key=lambda t: t[0])
        rows = []
        with ShardWriter(root / split, prefix=split) as writer:
            for key, it in tqdm(keyed, desc=f"{spec.name}/{split}", disable=not progress, leave=False):
                try:
                    src = io.BytesIO(it.data) if it.data is not None else it.source_path
                    img = load_rgb(src, max_pixels=max_pixels, max_side=max_side)
                except BadImage as e:
                    stats[f"dropped_{split}_{e.reason}"] = stats.get(f"dropped_{split}_{e.reason}", 0) + 1
                    log.warning("eval set %s: skipping %s (%s)", spec.name, it.source_path, e)
                    continue
                meta = {"label": label_of[it.label_name], "label_name": it.label_name, "source": "real",
                        "source_path": it.source_path, "evalset": spec.name, "split": split}
                shard = writer.write(key, encode_image(img), meta)
                rows.append({"key": key, "shard": shard, "label": label_of[it.label_name],
                             "label_name": it.label_name, "source_path": it.source_path})
        cols = ["key", "shard", "label", "label_name", "source_path"]
        write_index(pd.DataFrame(rows, columns=cols), root / split)
        stats[f"n_{split}"] = len(rows)
    (root / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    stats["n_classes"] = len(classes)
    return stats


def read_classes(set_dir: str | Path) -> list[str]:
    return json.loads((Path(set_dir) / "classes.json").read_text())
