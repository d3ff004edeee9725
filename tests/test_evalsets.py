"""evalsets: a fixed seeded split per class, bad images counted, shards + index the leakage stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pas.io.manifest import read_metrics, read_parquet
from pas.io.shards import iter_samples
from pas.params import ParamsError, build
from pas.train.evalsets import EvalParams, EvalSetSpec, Item, parse_sets, split_items, write_evalset
from tests.stage_helpers import load_stage
from tests.train_helpers import image_folder, synthetic_shards, write_params

ROOT = Path(__file__).resolve().parents[1]
CLIPART_FOOD = {"name": "clipart_food", "kind": "imagefolder", "path": "/usr/share/openclipart/png/food",
                "classes": ["beverages", "breads_and_carbs", "desserts", "fruit", "meats_and_eggs"],
                "test_fraction": 0.3, "min_per_class": 20}


def _items(per_class: dict[str, int]) -> list[Item]:
    return [Item(f"/x/{c}/{i:03d}.png", c) for c, n in per_class.items() for i in range(n)]


def test_split_counts_disjoint_and_seeded():
    spec = EvalSetSpec(name="s", kind="imagefolder", path="/x", test_fraction=0.3, min_per_class=5)
    items = _items({"a": 10, "b": 23, "c": 4})
    splits, classes, stats = split_items(spec, items, split_seed=0)
    assert classes == ["a", "b"] and stats["dropped_classes_small"] == 1
    for c, n in (("a", 10), ("b", 23)):
        tr = {i.source_path for i in splits["train"] if i.label_name == c}
        te = {i.source_path for i in splits["test"] if i.label_name == c}
        assert not tr & te and len(tr | te) == n
        assert len(te) == round(0.3 * n)                       # 3 of 10, 7 of 23
    again, _, _ = split_items(spec, list(reversed(items)), split_seed=0)   # input order does not matter
    assert [i.source_path for i in again["test"]] == [i.source_path for i in splits["test"]]
    other, _, _ = split_items(spec, items, split_seed=1)
    assert {i.source_path for i in other["test"]} != {i.source_path for i in splits["test"]}


def test_split_n_test_caps_and_class_subset():
    spec = EvalSetSpec(name="s", kind="imagefolder", path="/x", n_test=2, min_per_class=3, classes=("b",),
                       max_per_class=6)
    splits, classes, stats = split_items(spec, _items({"a": 10, "b": 9}), 0)
    assert classes == ["b"] and stats["dropped_classes_unlisted"] == 1
    assert len(splits["test"]) == 2 and len(splits["train"]) == 4
    with pytest.raises(ValueError, match=r"classes \['zz'\] not found"):
        split_items(EvalSetSpec(name="s", kind="imagefolder", path="/x", classes=("zz",)), _items({"a": 30}), 0)
    with pytest.raises(ValueError, match="min_per_class"):
        split_items(EvalSetSpec(name="s", kind="imagefolder", path="/x"), _items({"a": 3}), 0)
    # a tiny class still keeps one image on each side
    splits, _, _ = split_items(EvalSetSpec(name="s", kind="imagefolder", path="/x", test_fraction=0.01,
                                           min_per_class=2), _items({"a": 2}), 0)
    assert len(splits["test"]) == len(splits["train"]) == 1


def test_params_validation_names_the_key():
    with pytest.raises(ParamsError, match="eval.*kind"):
        build(EvalParams, {"eval": {"sets": [{"name": "a", "kind": "csv", "path": "/x"}]}}, "eval")
    with pytest.raises(ParamsError, match=r"eval.*sets\[a\]\.colour: unknown key"):
        build(EvalParams, {"eval": {"sets": [{"name": "a", "kind": "wds", "path": "/x", "colour": 1}]}}, "eval")
    with pytest.raises(ParamsError, match="duplicate"):
        parse_sets([{"name": "a", "kind": "wds", "path": "/x"}] * 2)
    with pytest.raises(ParamsError, match="n_test"):
        parse_sets([{"name": "a", "kind": "wds", "path": "/x", "n_test": 20, "min_per_class": 20}])
    with pytest.raises(ParamsError, match="name"):
        parse_sets([{"name": "../a", "kind": "wds", "path": "/x"}])


def test_imagefolder_with_bad_images(tmp_path):
    root = image_folder(tmp_path / "src", {"apple": 6, "bread": 6})
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))     # fully transparent: must become white, not black
    rgba.save(root / "apple" / "transparent.png")
    Image.new("1", (3000, 3000)).save(root / "bread" / "bomb.png")   # 9 Mpix from a tiny file
    (root / "bread" / "broken.png").write_bytes(b"not a png")
    spec = EvalSetSpec(name="toy", kind="imagefolder", path=str(root), n_test=2, min_per_class=4)
    stats = write_evalset(spec, tmp_path / "out", max_pixels=1_000_000, max_side=32, progress=False)
    dropped = {k: v for k, v in stats.items() if k.startswith("dropped_") and "classes" not in k}
    assert sum(dropped.values()) == 2 and stats["n_train"] + stats["n_test"] == 12 + 1
    assert {k.rsplit("_", 1)[-1] for k in dropped} <= {"large", "unreadable", "corrupt"}
    out = tmp_path / "out" / "toy"
    assert json.loads((out / "classes.json").read_text()) == ["apple", "bread"]
    for split in ("train", "test"):
        idx = read_parquet(out / split / "index.parquet")
        samples = list(iter_samples(out / split))
        assert list(idx.key) == sorted(s.key for s in samples) == [s.key for s in samples]
        assert len(idx) == stats[f"n_{split}"]
        for s in samples:
            assert s.meta["label"] == ["apple", "bread"].index(s.meta["label_name"])
            # provenance relative to the set's folder: the bytes do not depend on where it lives
            assert not Path(s.meta["source_path"]).is_absolute()
            assert (root / s.meta["source_path"]).is_file() and s.meta["source"] == "real"
            assert max(s.pil().size) <= 32
            if s.meta["source_path"].endswith("transparent.png"):
                assert np.asarray(s.pil()).min() > 240
    # byte-reproducible
    write_evalset(spec, tmp_path / "again", max_pixels=1_000_000, max_side=32, progress=False)
    for split in ("train", "test"):
        assert (out / split / f"{split}-000000.tar").read_bytes() == \
            (tmp_path / "again" / "toy" / split / f"{split}-000000.tar").read_bytes()
    # ... and the same set in another folder (another machine's eval.root) gives the same bytes
    import shutil

    shutil.copytree(root, tmp_path / "elsewhere" / "src")
    moved = EvalSetSpec(name="toy", kind="imagefolder", path=str(tmp_path / "elsewhere" / "src"), n_test=2,
                        min_per_class=4)
    write_evalset(moved, tmp_path / "moved", max_pixels=1_000_000, max_side=32, progress=False)
    for split in ("train", "test"):
        for name in (f"{split}-000000.tar", "index.parquet"):
            assert (out / split / name).read_bytes() == (tmp_path / "moved" / "toy" / split / name).read_bytes()


def test_wds_labels_and_preset_split(tmp_path):
    synthetic_shards(tmp_path / "flat", 40, maxcount=15)          # json label 0..3
    spec = EvalSetSpec(name="w", kind="wds", path=str(tmp_path / "flat"), n_test=3, min_per_class=5)
    stats = write_evalset(spec, tmp_path / "out", progress=False)
    assert stats["n_classes"] == 4 and stats["n_test"] == 12 and stats["n_train"] == 28
    for split, seed in (("train", 1), ("test", 2)):
        synthetic_shards(tmp_path / "pre" / split, 24, seed=seed)
    spec = EvalSetSpec(name="p", kind="wds", path=str(tmp_path / "pre"), min_per_class=5)
    stats = write_evalset(spec, tmp_path / "out", progress=False)
    assert stats["n_train"] == 24 and stats["n_test"] == 24           # the given split is kept
    bad = EvalSetSpec(name="b", kind="wds", path=str(tmp_path / "flat"), label_key="class")
    with pytest.raises(ValueError, match="label_key"):
        write_evalset(bad, tmp_path / "out", progress=False)


def test_food101_only_from_disk(tmp_path):
    spec = EvalSetSpec(name="f", kind="food101", path=str(tmp_path / "nope"), min_per_class=2)
    with pytest.raises(FileNotFoundError, match="Food-101 not found"):
        write_evalset(spec, tmp_path / "out", progress=False)
    base = tmp_path / "food" / "food-101"
    rng = np.random.default_rng(0)
    meta = {"train": {}, "test": {}}
    for cls in ("apple_pie", "ramen"):
        (base / "images" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(base / "images" / cls / f"{i}.jpg")
        meta["train"][cls] = [f"{cls}/{i}" for i in range(3)]
        meta["test"][cls] = [f"{cls}/{i}" for i in range(3, 5)]
    (base / "meta").mkdir()
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    spec = EvalSetSpec(name="f", kind="food101", path=str(tmp_path / "food"), min_per_class=2)
    stats = write_evalset(spec, tmp_path / "out", progress=False)
    assert (stats["n_train"], stats["n_test"], stats["n_classes"]) == (6, 4, 2)
    test_paths = sorted(read_parquet(tmp_path / "out" / "f" / "test" / "index.parquet").source_path)
    assert sorted(Path(p).stem for p in test_paths) == ["3", "3", "4", "4"]   # the official split


def _jpg(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(path)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _written(tmp_path: Path, spec: EvalSetSpec) -> dict[str, list[tuple[str, str]]]:
    """(file name, class) per split as write_evalset stored them."""
    write_evalset(spec, tmp_path / "out", progress=False)
    out = {}
    for split in ("train", "test"):
        idx = read_parquet(tmp_path / "out" / spec.name / split / "index.parquet")
        out[split] = sorted((Path(p).name, c) for p, c in zip(idx.source_path, idx.label_name))
    return out


def test_food101_official_txt_layout(tmp_path):
    """food-101/meta/{train,test}.txt (`class/id` lines) + images/<class>/<id>.jpg, official split."""
    base = tmp_path / "food-101"
    for i, rel in enumerate(["ramen/10", "ramen/11", "ramen/12", "pho/20", "pho/21", "pho/22"]):
        _jpg(base / "images" / f"{rel}.jpg", i)
    _write(base / "meta" / "train.txt", "ramen/10\nramen/11\npho/20\npho/21\n")
    _write(base / "meta" / "test.txt", "ramen/12\npho/22\n")
    spec = EvalSetSpec(name="f", kind="food101", path=str(base), min_per_class=2)   # the food-101 folder
    got = _written(tmp_path, spec)
    assert got["test"] == [("12.jpg", "ramen"), ("22.jpg", "pho")]
    assert len(got["train"]) == 4


def test_cub200_and_nabirds_official_layout(tmp_path):
    """images.txt + train_test_split.txt + image_class_labels.txt + classes.txt (shared layout)."""
    for kind, top, classes in (("cub200", "CUB_200_2011", {"1": "001.Black_footed_Albatross", "2": "002.Laysan_Albatross"}),
                               ("nabirds", "nabirds", {"295": "Common Eider (Adult male)", "296": "Ruddy Duck (Breeding male)"})):
        base = tmp_path / kind / top
        rows, split, labels = [], [], []
        for n, cid in enumerate(classes):
            for j in range(3):
                img_id = f"{kind}{n}{j}"
                rel = f"{cid.zfill(4)}/{img_id}.jpg"
                _jpg(base / "images" / rel, n * 3 + j)
                rows.append(f"{img_id} {rel}")
                split.append(f"{img_id} {0 if j == 0 else 1}")       # the first of each class is test
                labels.append(f"{img_id} {cid}")
        _write(base / "images.txt", "\n".join(rows) + "\n")
        _write(base / "train_test_split.txt", "\n".join(split) + "\n")
        _write(base / "image_class_labels.txt", "\n".join(labels) + "\n")
        _write(base / "classes.txt", "".join(f"{k} {v}\n" for k, v in classes.items()))
        # path = the dataset's parent folder (as extracted): the top folder is found
        got = _written(tmp_path, EvalSetSpec(name=kind, kind=kind, path=str(tmp_path / kind), min_per_class=2))
        names = list(classes.values())
        assert got["test"] == sorted([(f"{kind}00.jpg", names[0]), (f"{kind}10.jpg", names[1])])
        assert len(got["train"]) == 4 and {c for _, c in got["train"]} == set(names)
    with pytest.raises(FileNotFoundError, match="CUB-200-2011 not found"):
        write_evalset(EvalSetSpec(name="x", kind="cub200", path=str(tmp_path / "nope")), tmp_path / "o",
                      progress=False)


def test_foodx251_official_layout(tmp_path):
    """annot/{train,val}_info.csv (`file,class id`) + annot/class_list.txt; val is the test split."""
    base = tmp_path / "ifood"
    train, val = [], []
    for i in range(6):
        _jpg(base / "train_set" / f"train_{i:06d}.jpg", i)
        train.append(f"train_{i:06d}.jpg,{i % 2}")
    for i in range(2):
        _jpg(base / "val_set" / f"val_{i:06d}.jpg", 10 + i)
        val.append(f"val_{i:06d}.jpg,{i}")
    _write(base / "annot" / "train_info.csv", "\n".join(train) + "\n")
    _write(base / "annot" / "val_info.csv", "\n".join(val) + "\n")
    _write(base / "annot" / "class_list.txt", "0 macaron\n1 beignet\n")
    got = _written(tmp_path, EvalSetSpec(name="x", kind="foodx251", path=str(base), min_per_class=2))
    assert got["test"] == [("val_000000.jpg", "macaron"), ("val_000001.jpg", "beignet")]
    assert len(got["train"]) == 6


def test_food2k_official_layout(tmp_path):
    """Food2k_complete/<class id>/*.jpg + meta_data/{train,test}_finetune.txt (`/<id>/<file> <id>`)."""
    base = tmp_path / "Food2k_complete"
    train, test = [], []
    for c in range(2):
        for j in range(3):
            _jpg(base / str(c) / f"{j}.jpg", c * 3 + j)
            (test if j == 0 else train).append(f"/{c}/{j}.jpg {c}")
    _write(base / "meta_data" / "train_finetune.txt", "\n".join(train) + "\n")
    _write(base / "meta_data" / "test_finetune.txt", "\n".join(test) + "\n")
    _write(base / "food2k_label2name_en.txt", "0000--Jiaozi\n0001--Mapo tofu\n")
    got = _written(tmp_path, EvalSetSpec(name="x", kind="food2k", path=str(tmp_path), min_per_class=2))
    assert got["test"] == [("0.jpg", "Jiaozi"), ("0.jpg", "Mapo tofu")]
    assert len(got["train"]) == 4
    # a leakage-only set: the test split only
    lo = _written(tmp_path, EvalSetSpec(name="y", kind="food2k", path=str(base), min_per_class=2, evaluate=False))
    assert lo["test"] == got["test"] and lo["train"] == []


def test_inat_birds_from_coco_json(tmp_path):
    """val.json / train_mini.json (COCO style); supercategory Aves keeps the bird categories
    (iNat 2021 spells supercategory "Birds", class "Aves"; iNat 2017 supercategory "Aves")."""
    cats = [{"id": 0, "name": "Corvus corax", "supercategory": "Birds", "class": "Aves"},
            {"id": 1, "name": "Pica pica", "supercategory": "Aves"},
            {"id": 2, "name": "Vulpes vulpes", "supercategory": "Mammals", "class": "Mammalia"}]
    for split, per in (("train_mini", 3), ("val", 1)):
        images, anns = [], []
        for c in range(3):
            for j in range(per):
                i = len(images)
                rel = f"{split}/{c:05d}/{split}{c}{j}.jpg"
                _jpg(tmp_path / "inat" / rel, 100 * c + j + (50 if split == "val" else 0))
                images.append({"id": i, "file_name": rel})
                anns.append({"id": i, "image_id": i, "category_id": c})
        _write(tmp_path / "inat" / f"{split}.json", json.dumps({"images": images, "annotations": anns,
                                                                  "categories": cats}))
    spec = EvalSetSpec(name="inat_birds", kind="inat", path=str(tmp_path / "inat"), supercategory="Aves",
                       min_per_class=2)
    got = _written(tmp_path, spec)
    assert got["test"] == [("val00.jpg", "Corvus corax"), ("val10.jpg", "Pica pica")]
    assert len(got["train"]) == 6 and "Vulpes vulpes" not in {c for _, c in got["train"]}
    (tmp_path / "inat" / "train_mini.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_mini.json"):
        write_evalset(spec, tmp_path / "out", progress=False)


def test_eval_root_resolves_relative_set_paths():
    p = build(EvalParams, {"eval": {"root": "/data/sets", "sets": [
        {"name": "a", "kind": "cub200", "path": "CUB_200_2011"},
        {"name": "b", "kind": "imagefolder", "path": "/elsewhere/b"}]}}, "eval")
    assert [s.path for s in p.specs] == ["/data/sets/CUB_200_2011", "/elsewhere/b"]


def test_stage_main_on_real_clipart(tmp_path):
    params = write_params(tmp_path / "params.yaml", eval={"sets": [CLIPART_FOOD], "max_side": 64})
    out = tmp_path / "evalsets"
    (out / "stale_set").mkdir(parents=True)
    argv = ["--out", str(out), "--params", str(params), "--metrics", str(tmp_path / "m.json")]
    assert load_stage("evalsets").main(argv) == 0
    m = read_metrics(tmp_path / "m.json")["clipart_food"]
    assert m["n_classes"] == 5 and m["n_train"] > 150 and m["n_test"] > 60
    dropped = sum(v for k, v in m.items() if k.startswith("dropped_t"))
    assert dropped >= 1                                   # the 169-Mpix clipart files are skipped, counted
    assert not (out / "stale_set").exists()
    test_idx = read_parquet(out / "clipart_food" / "test" / "index.parquet")
    assert set(test_idx.label_name) == set(CLIPART_FOOD["classes"])
    first = (out / "clipart_food" / "test" / "test-000000.tar").read_bytes()
    assert load_stage("evalsets").main(argv) == 0            # written once: a rerun gives the same bytes
    assert (out / "clipart_food" / "test" / "test-000000.tar").read_bytes() == first
