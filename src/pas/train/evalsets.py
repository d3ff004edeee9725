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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pas.data.images import BadImage, load_rgb
from pas.jsonio import write_json
from pas.params import ParamsError, build, check_choice, check_range, check_seed

log = logging.getLogger(__name__)

KINDS = ("imagefolder", "wds", "food101", "cub200", "nabirds", "foodx251", "food2k", "inat")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class EvalSetSpec:
    """One evaluation dataset (an item of `eval.sets`)."""

    name: str                          # output folder name, [A-Za-z0-9_-]
    kind: str                          # imagefolder | wds | an official layout: food101 | foodx251 | food2k |
                                       # cub200 | nabirds | inat (see the _list_<kind> functions)
    path: str                          # the set's folder; relative = under eval.root
    classes: tuple[str, ...] | None = None  # subset of class names (None: every class with >= min_per_class)
    test_fraction: float = 0.3         # share of each class held out for test (not for official splits)
    n_test: int | None = None          # fixed test images per class instead of test_fraction
    min_per_class: int = 20            # classes with fewer images are left out (and counted)
    max_per_class: int | None = None   # seeded cap per class and split (None: all)
    label_key: str = "label"           # wds: JSON field holding the class (int or name)
    supercategory: str | None = None   # inat: keep categories with this supercategory or class (Aves)
    evaluate: bool = True              # false: a leakage-only set (test split written, train not,
                                       # evaluate skips it), e.g. Food-2K / iNat birds in the presets

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
    root: str | None = None                # folder holding the sets: the evalsets stage's one DVC dep
                                           # for them (any number of sets); relative set paths are under it
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
        if self.root is not None and not self.root:
            raise ParamsError("eval.root: must be a folder path or null")
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
        """The sets, with relative paths taken under `root`."""
        specs = parse_sets(list(self.sets))
        if self.root is None:
            return specs
        return tuple(replace(s, path=str(Path(self.root) / s.path)) if not Path(s.path).is_absolute() else s
                     for s in specs)


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
    return [Item(str(f), cdir.name) for cdir in sorted(p for p in root.iterdir() if p.is_dir())
            for f in sorted(cdir.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTS]


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


def _dataset_root(spec: EvalSetSpec, marker: str, subdirs: tuple[str, ...], what: str) -> Path:
    """The folder holding `marker`: spec.path itself or one of its `subdirs` (the archive's top folder)."""
    root = Path(spec.path)
    for d in (root, *(root / s for s in subdirs)):
        if (d / marker).exists():
            return d
    raise FileNotFoundError(f"eval set {spec.name!r}: {what} not found under {root} (no {marker} in it or in "
                            f"{', '.join(subdirs) or 'a sub-folder'}); kind {spec.kind} reads the official layout")


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _list_food101(spec: EvalSetSpec) -> list[Item]:
    """Food-101 (Bossard et al. 2014) as released: `food-101/meta/{train,test}.txt` (`class/id` lines;
    the `.json` twins are read when the `.txt` are missing) and `food-101/images/<class>/<id>.jpg`.
    `path` = the `food-101` folder or its parent (torchvision's Food101 root). Official split."""
    base = _dataset_root(spec, "meta", ("food-101",), "Food-101")
    items = []
    for split in SPLITS:
        txt, js = base / "meta" / f"{split}.txt", base / "meta" / f"{split}.json"
        if txt.is_file():
            rels = _lines(txt)
        elif js.is_file():
            meta = json.loads(js.read_text())
            rels = [r for c in sorted(meta) for r in meta[c]]
        else:
            raise FileNotFoundError(f"eval set {spec.name!r}: Food-101 not found: no {txt}")
        items.extend(Item(str(base / "images" / f"{rel}.jpg"), rel.split("/")[0], split) for rel in sorted(rels))
    return items


def _list_cub_style(spec: EvalSetSpec) -> list[Item]:
    """CUB-200-2011 (`cub200`) and NABirds (`nabirds`), which share a layout: `images.txt`
    (`<image id> <path under images/>`), `train_test_split.txt` (`<image id> <1 = train, 0 = test>`),
    `image_class_labels.txt` (`<image id> <class id>`), `classes.txt` (`<class id> <name>`). `path` =
    that folder or its parent (`CUB_200_2011/`, `nabirds/`). Official split; label = the class name."""
    what, sub = {"cub200": ("CUB-200-2011", ("CUB_200_2011",)), "nabirds": ("NABirds", ("nabirds",))}[spec.kind]
    base = _dataset_root(spec, "images.txt", sub, what)

    def table(name: str) -> dict[str, str]:
        f = base / name
        if not f.is_file():
            raise FileNotFoundError(f"eval set {spec.name!r}: {what}: {f} missing")
        return dict(ln.split(maxsplit=1) for ln in _lines(f))

    paths, is_train = table("images.txt"), table("train_test_split.txt")
    labels, names = table("image_class_labels.txt"), table("classes.txt")
    items = []
    for img_id, rel in paths.items():
        if img_id not in is_train or img_id not in labels:
            raise ValueError(f"eval set {spec.name!r}: image {img_id} has no split or class in {base}")
        split = "train" if is_train[img_id].strip() == "1" else "test"
        items.append(Item(str(base / "images" / rel), names[labels[img_id].strip()], split))
    return items


def _list_foodx251(spec: EvalSetSpec) -> list[Item]:
    """FoodX-251 (iFood 2019) as released: `annot/{train,val}_info.csv` (`<file>,<class id>`, no header),
    `annot/class_list.txt` (`<class id> <name>`), images in `train_set/` and `val_set/`. The test set's
    labels are not public, so `val` is the test split (as in the paper's evaluations)."""
    base = _dataset_root(spec, "annot", ("foodx251", "ifood2019"), "FoodX-251")
    cl = base / "annot" / "class_list.txt"
    names = dict(ln.split(maxsplit=1) for ln in _lines(cl)) if cl.is_file() else {}
    items = []
    for split, csv_name, folder in (("train", "train_info.csv", "train_set"), ("test", "val_info.csv", "val_set")):
        f = base / "annot" / csv_name
        if not f.is_file():
            raise FileNotFoundError(f"eval set {spec.name!r}: FoodX-251: {f} missing")
        for ln in _lines(f):
            fname, label = (v.strip() for v in ln.split(","))
            items.append(Item(str(base / folder / fname), names.get(label, label), split))
    return items


def _list_food2k(spec: EvalSetSpec) -> list[Item]:
    """Food2K (Min et al. 2023) as released: class folders `<class id>/` under the image root
    `Food2k_complete/`, split lists `{train,test}_finetune.txt` (`<path under the image root> <class
    id>`, the path may start with `/`) in `meta_data/` or `Food2k_label/`, and class names in
    `food2k_label2name_en.txt` (`<class id>--<name>`, optional). `path` = the image root or its parent;
    the lists are looked up in both, never outside `path` (it is the DVC dependency)."""
    root = Path(spec.path)
    bases = [d for d in (root / "Food2k_complete", root) if d.is_dir()]
    metas = [m for d in (root, *bases) for m in (d / "meta_data", d / "Food2k_label", d)]
    meta = next((m for m in metas if (m / "test_finetune.txt").is_file()), None)
    if not bases or meta is None:
        raise FileNotFoundError(f"eval set {spec.name!r}: Food2K not found under {root} (no "
                                "meta_data/test_finetune.txt or Food2k_label/test_finetune.txt)")
    base = bases[0]
    names = {}
    for f in (base / "food2k_label2name_en.txt", meta / "food2k_label2name_en.txt"):
        if f.is_file():
            names = {str(int(a)): b.strip() for a, _, b in (ln.partition("--") for ln in _lines(f))}
            break
    items = []
    for split in SPLITS:
        f = meta / f"{split}_finetune.txt"
        if not f.is_file():
            raise FileNotFoundError(f"eval set {spec.name!r}: Food2K: {f} missing")
        for ln in _lines(f):
            rel, label = ln.rsplit(maxsplit=1)
            label = str(int(label))
            items.append(Item(str(base / rel.lstrip("/")), names.get(label, label), split))
    return items


def _list_inat(spec: EvalSetSpec) -> list[Item]:
    """iNaturalist 2021 (also 2017/2018) as released: COCO-style `val.json` (test) and `train_mini.json`
    (train; `train.json` when mini is absent) with `images` (id, file_name under the root),
    `annotations` (image_id, category_id) and `categories`; `supercategory` keeps the categories whose
    `supercategory` or `class` field equals it ("Aves": iNat birds; 2021 names the supercategory
    "Birds" and the class "Aves"). Label = the category's `name`. A leakage-only set
    (`evaluate: false`) needs only val.json."""
    base = _dataset_root(spec, "val.json", (), "iNaturalist")
    train = next((base / f for f in ("train_mini.json", "train.json") if (base / f).is_file()), None)
    if train is None and spec.evaluate:
        raise FileNotFoundError(f"eval set {spec.name!r}: iNaturalist: no train_mini.json or train.json in {base}")
    items = []
    for split, f in (("train", train), ("test", base / "val.json")):
        if f is None or (split == "train" and not spec.evaluate):
            continue
        coco = json.loads(f.read_text())
        cats = {c["id"]: c for c in coco["categories"]
                if spec.supercategory is None or spec.supercategory in (c.get("supercategory"), c.get("class"))}
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        for a in coco["annotations"]:
            if a["category_id"] in cats:
                items.append(Item(str(base / files[a["image_id"]]), str(cats[a["category_id"]]["name"]), split))
    if not items:
        raise ValueError(f"eval set {spec.name!r}: no iNaturalist category has supercategory or class "
                         f"{spec.supercategory!r}")
    return items


LISTERS = {"imagefolder": _list_imagefolder, "wds": _list_wds, "food101": _list_food101,
           "cub200": _list_cub_style, "nabirds": _list_cub_style, "foodx251": _list_foodx251,
           "food2k": _list_food2k, "inat": _list_inat}


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
        if len(its) < spec.min_per_class and spec.evaluate:    # leakage-only: every test image counts
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
    if not spec.evaluate:                 # leakage compares against test only: skip decoding train
        items = [it for it in items if it.split != "train"]
    splits, classes, stats = split_items(spec, items, split_seed)
    if not spec.evaluate:
        splits["train"] = []
    label_of = {c: i for i, c in enumerate(classes)}
    root = Path(out_dir) / spec.name
    root.mkdir(parents=True, exist_ok=True)
    def rel(path: str) -> str:
        """A path under the set's folder, relative to it: keys and stored provenance must not depend
        on where a machine keeps the set (same bytes in any clone, for any eval.root)."""
        p = Path(path)
        return p.relative_to(spec.path).as_posix() if p.is_relative_to(spec.path) else path

    for split in SPLITS:
        keyed = sorted(((make_key("e", spec.name, r), r, it) for it in splits[split] for r in [rel(it.source_path)]),
                       key=lambda t: t[0])
        rows = []
        with ShardWriter(root / split, prefix=split) as writer:
            for key, source_path, it in tqdm(keyed, desc=f"{spec.name}/{split}", disable=not progress,
                                             leave=False):
                try:
                    src = io.BytesIO(it.data) if it.data is not None else it.source_path
                    img = load_rgb(src, max_pixels=max_pixels, max_side=max_side)
                except BadImage as e:
                    stats[f"dropped_{split}_{e.reason}"] = stats.get(f"dropped_{split}_{e.reason}", 0) + 1
                    log.warning("eval set %s: skipping %s (%s)", spec.name, it.source_path, e)
                    continue
                row = {"label": label_of[it.label_name], "label_name": it.label_name, "source_path": source_path}
                shard = writer.write(key, encode_image(img), {**row, "source": "real", "evalset": spec.name,
                                                             "split": split})
                rows.append({"key": key, "shard": shard, **row})
        cols = ["key", "shard", "label", "label_name", "source_path"]
        write_index(pd.DataFrame(rows, columns=cols), root / split)
        stats[f"n_{split}"] = len(rows)
    write_json(root / "classes.json", classes, indent=1)   # a list: sorting keys changes nothing
    stats["n_classes"] = len(classes)
    return stats


def read_classes(set_dir: str | Path) -> list[str]:
    return json.loads((Path(set_dir) / "classes.json").read_text())
