"""metrics/claim.json — the paper's claim in miniature (benchmarks/claim.py) — measures the committed dataset."""

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _claim_module():
    spec = importlib.util.spec_from_file_location("claim", ROOT / "benchmarks" / "claim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dataset_md5_reads_the_prune_out(tmp_path):
    lock = {"schema": "2.0", "stages": {"dedup": {"outs": [{"path": "data/dedup", "md5": "a.dir"}]},
                                        "prune": {"outs": [{"path": "data/prune", "md5": "b.dir"},
                                                           {"path": "data/dataset", "md5": "c.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert _claim_module().dataset_md5(tmp_path / "dvc.lock") == "c.dir"


def test_committed_claim_measures_the_committed_dataset():
    claim = json.loads((ROOT / "metrics" / "claim.json").read_text())
    want = _claim_module().dataset_md5(ROOT / "dvc.lock")
    assert claim["dataset_md5"] == want, (
        f"metrics/claim.json measured dataset {claim['dataset_md5']}, dvc.lock has {want}: "
        "rerun `python benchmarks/claim.py --seeds 0 1 2` after `dvc repro` and commit it")
    assert claim["seeds"] == [0, 1, 2]
    for arm in ("curated", "random_sample", "random_init"):
        assert set(claim[arm]) == {"knn_top1_mean", "knn_top1_std", "linear_top1_mean", "linear_top1_std"}
        assert all(0.0 <= v <= 1.0 for v in claim[arm].values())
    assert "metrics/claim.json" in yaml.safe_load((ROOT / "dvc.yaml").read_text())["metrics"]
