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


WRITER = """import sys, time
from pathlib import Path
from pas.io.manifest import write_metrics

# a run counter kept in git-ignored scratch/, as resume markers are: every run differs in it and in time
c = Path("scratch/runs")
c.parent.mkdir(exist_ok=True)
k = int(c.read_text()) + 1 if c.exists() else 1
c.write_text(str(k))
write_metrics(sys.argv[1], {"n_out": 3, "top1": 0.5, "seconds": time.time(), "n_shards_resumed": k,
                            "per_set": {"food": {"n": 2, "seconds_per_image": time.time() / 7}},
                            "n_drawn": 3 - k}, run_keys=("n_drawn",))
"""


def test_a_rerun_with_identical_inputs_leaves_metrics_diff_empty(tmp_path):
    """Two stages whose metrics writers see other timings and resume counters on every run: after
    `dvc repro -f` nothing tracked changed, `dvc metrics diff` prints nothing and git sees no change."""
    import shutil

    from tests.dvc_helpers import REPO

    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "t@example.com"], repo)
    run(["git", "config", "user.name", "test"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")     # the real ignore rules, run logs included
    (repo / "w.py").write_text(WRITER)
    stage = "cmd: python w.py metrics/{0}.json\n    deps: [w.py{1}]\n    metrics: [metrics/{0}.json: {{cache: false}}]"
    (repo / "dvc.yaml").write_text(f"stages:\n  a:\n    {stage.format('a', '')}\n"
                                   f"  b:\n    {stage.format('b', ', metrics/a.json')}\n")
    env = {"PYTHONPATH": str(REPO / "src")}
    run(["dvc", "repro"], repo, env=env)
    assert json.loads((repo / "metrics/a.json").read_text()) == {"n_out": 3, "top1": 0.5,
                                                                "per_set": {"food": {"n": 2}}}
    _commit(repo, "first run")
    run(["dvc", "repro", "-f"], repo, env=env)
    assert json.loads((repo / "metrics/b.run.json").read_text())["n_shards_resumed"] == 4   # it did rerun
    assert run(["dvc", "metrics", "diff", "HEAD"], repo).stdout.strip() == ""
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
    show = run(["dvc", "metrics", "show"], repo).stdout
    assert "top1" in show and "seconds" not in show and "resumed" not in show
