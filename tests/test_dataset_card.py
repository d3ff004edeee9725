"""The final dataset as users load it: one sample schema, a dataset card the real Hugging Face
`datasets` library reads offline, provenance fields and the takedown list."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from pas.curate.card import dataset_card
from pas.curate.export import SAMPLE_FIELDS, export_dataset, read_takedown
from pas.io.shards import ShardWriter, iter_samples


def _jpg(c) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), c).save(b, "JPEG")
    return b.getvalue()


@pytest.fixture
def built(tmp_path):
    """6 synthetic images (keys sort first, as `g…` do in real runs) and 4 real ones, one from a URL."""
    with ShardWriter(tmp_path / "gen", prefix="generated") as w:
        for i in range(6):
            w.write(f"g{i:03d}", _jpg((40 * i, 0, 0)),
                    {"key": f"g{i:03d}", "source": "synthetic", "concept": "pho", "caption": "a bowl of pho",
                     "caption_idx": 0, "image_idx": i, "seed": i, "fallback_caption": False})
    with ShardWriter(tmp_path / "ret", prefix="retrieved") as w:
        for i in range(4):
            meta = {"key": f"p{i:03d}", "source": "real", "concepts": ["pho", "ramen"],
                    "similarities": [0.3, 0.2], "pool_key": f"p{i:03d}"}
            if i == 3:
                meta.update(pool_key=None, url="http://img.example/ramen.jpg", caption="ramen bowl")
            w.write(f"p{i:03d}", _jpg((0, 40 * i, 0)), meta)
    keys = [f"g{i:03d}" for i in range(6)] + [f"p{i:03d}" for i in range(4)]
    table = pd.DataFrame({"key": keys, "front": 0, "removed": [False] * 9 + [True], "ood_b": 0.1,
                          "ood_bprime": 0.2, "ood_blur_delta": 0.0, "text_boxes": 0})
    return tmp_path, table


def test_every_sample_has_the_one_schema(built):
    tmp, table = built
    rep = export_dataset([tmp / "ret", tmp / "gen"], table, tmp / "ds", progress=False)
    metas = {s.key: s.meta for s in iter_samples(tmp / "ds")}
    assert len(metas) == 9 and rep.n_takedown == 0
    assert all(set(m) == set(SAMPLE_FIELDS) for m in metas.values())
    assert metas["g000"]["concepts"] == ["pho"] and metas["g000"]["similarities"] == []
    assert metas["g000"]["url"] is None and metas["g000"]["seed"] == 0
    assert metas["p001"]["concepts"] == ["pho", "ramen"] and metas["p001"]["similarities"] == [0.3, 0.2]
    assert metas["p001"]["pool_key"] == "p001" and metas["p001"]["seed"] is None
    assert metas["p000"]["pareto_front"] == 0 and metas["p000"]["ood_bprime"] == 0.2
    assert list(rep.index.columns[:9]) == ["key", "shard", "source", "concepts", "caption", "url",
                                           "pool_key", "path", "license"]


def test_takedown_by_key_and_by_url(built, tmp_path):
    tmp, table = built
    lst = tmp_path / "takedown.txt"
    lst.write_text("# requests\np001   # by key\n\nhttp://img.example/ramen.jpg\n")
    table.loc[table["key"] == "p003", "removed"] = False
    assert read_takedown(lst) == {"p001", "http://img.example/ramen.jpg"}
    rep = export_dataset([tmp / "ret", tmp / "gen"], table, tmp / "ds", progress=False,
                         takedown=read_takedown(lst))
    assert rep.n_takedown == 2
    assert sorted(rep.index["key"]) == ["g000", "g001", "g002", "g003", "g004", "g005", "p000", "p002"]
    assert rep.sources_kept == {"synthetic": 6, "real": 2}
    with pytest.raises(FileNotFoundError, match="prune.takedown"):
        read_takedown(tmp_path / "missing.txt")


def test_hugging_face_datasets_loads_the_folder_with_every_field(built, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp, table = built
    export_dataset([tmp / "ret", tmp / "gen"], table, tmp / "ds", progress=False)
    funnel = {"retrieve": {"n": 4, "real": 4}, "final": {"n": 9, "real": 3, "synthetic": 6}}
    card = dataset_card(domain={"name": "food", "description": "dishes"}, funnel=funnel,
                        prune={"n_in": 10, "fronts": 1, "stop_reason": "knee", "stop_x": 1},
                        concepts={"B_after_validation": 2})
    (tmp / "ds" / "README.md").write_text(card)
    ds = datasets.load_dataset(str(tmp / "ds"), split="train", cache_dir=str(tmp / "hf-cache"))
    assert len(ds) == 9          # the images, not index.parquet's rows
    rows = {r["__key__"]: r for r in ds}
    # real rows come after five synthetic ones: the declared schema keeps their fields
    assert rows["p001"]["json"]["concepts"] == ["pho", "ramen"]
    assert rows["p001"]["json"]["similarities"] == [0.3, 0.2]
    assert rows["p001"]["json"]["pool_key"] == "p001"
    assert rows["g002"]["json"]["caption"] == "a bowl of pho" and rows["g002"]["json"]["url"] is None
    assert rows["g002"]["jpg"].size == (8, 8)


def test_the_card_is_pure_and_says_what_was_built():
    kw = dict(domain={"name": "food"}, funnel={"final": {"n": 1234, "real": 1000, "synthetic": 234},
                                                  "dedup": {"n": 2000, "real": 1700, "synthetic": 300}},
              prune={"n_in": 1500, "fronts": 40, "stop_reason": "knee", "stop_x": 266})
    card = dataset_card(**kw)
    assert card == dataset_card(**kw)
    assert card.startswith("---\n") and "size_categories:\n- 1K<n<10K" in card
    assert "**1,234 images**: 1,000 real, 234 synthetic" in card
    assert "| dedup | 2,000 | 1,700 | 300 |" in card
