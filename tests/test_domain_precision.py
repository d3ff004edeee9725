"""Domain precision (evaluation only): hand-computed cases, and proof that curation never reads labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pas.curate.precision import PrecisionParams, domain_precision, in_domain
from pas.params import ParamsError
from tests.helpers import file_digests
from tests.test_retrieve import FakeEncoder, make_pool

ROOT = Path(__file__).resolve().parents[1]


def test_in_domain_is_the_category_or_below_it():
    cats = pd.Series(["food", "food/fruit", "foodstuff", "animals/food", "", None, "food/"])
    assert in_domain(cats, ["food"]).tolist() == [True, True, False, False, False, False, True]
    assert in_domain(cats, ["food/fruit", "animals"]).tolist() == [False, True, False, True, False, False, False]


def test_domain_precision_hand_computed():
    pool = pd.DataFrame({"key": ["a", "b", "c", "d", "e"],
                         "category": ["food/fruit", "food", "animals", "buildings", "food/meats"]})
    keys = {"retrieve": ["a", "b", "c", "d"], "dedup": ["a", "c", "d"], "leakage": ["a", "c"],
            "final": ["a", "a", "g"]}       # duplicates count once; keys not in the pool (synthetic) not at all
    m = domain_precision(keys, pool, ["food"])
    assert m["pool"] == {"n_real": 5, "n_domain": 3, "domain_precision": 0.6}
    assert m["retrieve"] == {"n_real": 4, "n_domain": 2, "domain_precision": 0.5}
    assert m["dedup"] == {"n_real": 3, "n_domain": 1, "domain_precision": round(1 / 3, 6)}
    assert m["leakage"]["domain_precision"] == 0.5
    assert m["final"] == {"n_real": 1, "n_domain": 1, "domain_precision": 1.0}
    assert domain_precision({"final": []}, pool, ["food"])["final"]["domain_precision"] is None


def test_params_refuse_an_empty_category():
    with pytest.raises(ParamsError, match="domain_categories"):
        PrecisionParams(domain_categories=["/"])


CURATION_STAGES = ("retrieve", "generate", "dedup", "leakage", "ood", "prune")


@pytest.mark.parametrize("stage", CURATION_STAGES)
def test_no_curation_module_reads_the_categories(stage):
    """The categories are written by the pool stage and read only by `precision` (and by the offline
    model training, as alt text): no module a curation stage imports, besides the pool's writer,
    mentions them."""
    from tests.test_dvc_deps import import_closure

    closure = import_closure(ROOT / "stages" / f"{stage}.py")
    readers = [f for f in sorted(closure) if f != "src/pas/data/pool.py"
               and "category" in (ROOT / f).read_text()]
    assert not readers, f"{stage} imports modules that read pool categories: {readers}"


def test_shuffled_labels_leave_retrieval_unchanged(tmp_path):
    """Permuting the pool's categories changes the measured precision and nothing that retrieve writes."""
    from pas.collect.retrieve import RetrieveParams, retrieve_from_pool

    pool_a = tmp_path / "pool_a"
    E, keys = make_pool(pool_a, n=30)
    idx = pd.read_parquet(pool_a / "index.parquet")
    idx["category"] = ["food/fruit" if i % 3 == 0 else "animals" for i in range(len(idx))]
    idx.to_parquet(pool_a / "index.parquet", index=False)
    pool_b = tmp_path / "pool_b"
    shutil.copytree(pool_a, pool_b)
    shuffled = idx.copy()
    shuffled["category"] = np.random.default_rng(0).permutation(idx["category"].to_numpy())
    assert (shuffled["category"] != idx["category"]).any()
    shuffled.to_parquet(pool_b / "index.parquet", index=False)

    enc = FakeEncoder({"a photo of x.": E[0] + E[3], "a photo of y.": E[5]})
    p = RetrieveParams(k_retrieve=4)
    outs = []
    for pool in (pool_a, pool_b):
        out = tmp_path / f"out_{pool.name}"
        retrieve_from_pool(["x", "y"], enc, pool, out, p, progress=False)
        outs.append(out)
    assert file_digests(outs[0]) == file_digests(outs[1])
    got = pd.read_parquet(outs[0] / "index.parquet")["key"]
    pa = domain_precision({"retrieve": got}, idx, ["food"])["retrieve"]["domain_precision"]
    pb = domain_precision({"retrieve": got}, shuffled, ["food"])["retrieve"]["domain_precision"]
    assert pa != pb
