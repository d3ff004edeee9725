"""What a pull request comment shows: `dvc metrics diff --md` and `dvc params diff --md` between commits."""

import json

import pytest

from tests.dvc_helpers import make_repo, run, set_params


def _commit(repo, msg):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", msg], repo)


@pytest.mark.slow
def test_metrics_and_params_diff_markdown(tmp_path):
    repo = make_repo(tmp_path / "repo")
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/eval.json").write_text(json.dumps({"food": {"knn_top1": 0.40, "linear_top1": 0.45}}))
    (repo / "metrics/dataset.json").write_text(json.dumps({"final": 900, "after_dedup": 1200}))
    _commit(repo, "baseline")
    set_params(repo, {"lambda_dup": 0.5})
    (repo / "metrics/eval.json").write_text(json.dumps({"food": {"knn_top1": 0.43, "linear_top1": 0.45}}))
    (repo / "metrics/dataset.json").write_text(json.dumps({"final": 850, "after_dedup": 1100}))
    _commit(repo, "ablation")

    md = run(["dvc", "metrics", "diff", "--md", "HEAD~1"], repo).stdout
    assert md.lstrip().startswith("| Path")
    lines = md.splitlines()
    knn = next(line for line in lines if "food.knn_top1" in line)
    assert "0.4" in knn and "0.43" in knn and "0.03" in knn
    final = next(line for line in lines if "| final" in line or " final " in line)
    assert "900" in final and "850" in final and "-50" in final
    assert not any("linear_top1" in line for line in lines)  # unchanged metrics are not listed

    pmd = run(["dvc", "params", "diff", "--md", "HEAD~1"], repo).stdout
    row = next(line for line in pmd.splitlines() if "lambda_dup" in line)
    assert "0.9995" in row and "0.5" in row
