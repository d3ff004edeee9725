"""The pull-request comment (pas.prcomment): headline rows only, params, and a plots diff that holds main
or says loudly that it does not."""

from __future__ import annotations

import json
import shutil

import pytest

from pas.prcomment import MARKER, MAX_CHARS, comment_body, headline_rows, main, other_changes, plot_problems
from tests.dvc_helpers import run

# hand-made `dvc metrics diff --all --json main`: flat keys, `diff` only for numbers on both sides
DIFF = {
    "metrics/summary.json": {
        "top1.food.knn": {"old": 0.4, "new": 0.45, "diff": 0.05},
        "size.total": {"old": 900, "new": 1200, "diff": 300},
        "funnel.prune": {"old": 900, "new": 1200, "diff": 300},
        "funnel.retrieve": {"old": 1000, "new": 1000, "diff": 0},
        "concept_bank": {"old": 40, "new": None},
        "covered.cub": {"old": None, "new": 0.2},
        "domain_precision.final": {"old": 0.5, "new": 0.50001, "diff": 0.00001},
    },
    "metrics/pool.json": {"n_files": {"old": 10, "new": 11, "diff": 1}, "dim": {"old": 384, "new": 384, "diff": 0}},
    "metrics/eval.json": {"backbone": {"old": "vit_tiny", "new": "vit_tiny"}},
}


def test_headline_rows_are_summary_json_only_in_summary_order():
    assert headline_rows(DIFF) == [
        ("images", "900", "1,200", "+300"),
        ("concepts (|B| after validation)", "40", "—", "removed"),
        ("funnel: retrieve", "1,000", "1,000", ""),
        ("funnel: prune", "900", "1,200", "+300"),
        ("domain precision: final", "0.500", "0.500", "+1.0e-05"),
        ("cub: classes covered", "—", "0.200", "new"),
        ("food: kNN top-1", "0.400", "0.450", "+0.050"),
    ]
    assert other_changes(DIFF) == {"metrics/pool.json": 1}


def test_comment_body():
    params = {"params.yaml": {"prune.stop": {"old": "knee", "new": "target"}},
              "configs/x.yaml": {"a": {"old": 1, "new": 2}}}
    body = comment_body(DIFF, params, {"data": {"funnel": [{"revisions": ["workspace", "main"]}]}},
                        "https://example.com/artifact/1")
    lines = body.splitlines()
    assert lines[0] == MARKER
    assert "| images | 900 | 1,200 | +300 |" in lines
    assert r"| concepts (\|B\| after validation) | 40 | — | removed |" in lines   # a | in a cell is escaped
    assert "| prune.stop | knee | target |" in lines and "| configs/x.yaml:a | 1 | 2 |" in lines
    assert "n_files" not in body and "`metrics/pool.json` (1)" in body   # other files: named, not listed
    assert "incomplete" not in body and "[dvc plots diff artifact](https://example.com/artifact/1)" in body
    assert "No param changed." in comment_body({}, {})
    assert "did not reach the `summary` stage" in comment_body({}, {})


def test_comment_body_is_cut_under_githubs_limit():
    params = {"params.yaml": {f"k{i:05d}": {"old": "x" * 500, "new": "y" * 500} for i in range(200)}}
    body = comment_body({}, params)
    assert "… and 160 more" in body                       # 40 params rows at most
    huge = {"metrics/summary.json": {f"extra_{i:05d}": {"old": "x" * 200, "new": "y"} for i in range(400)}}
    body = comment_body(huge, {})
    assert len(body) <= MAX_CHARS + 100 and body.endswith("size limit)\n")


def test_plot_problems_name_what_main_lacks():
    dropped = {"errors": [{"rev": "main", "type": "DataIndexDirError", "msg": "failed to load directory ('data', 'prune')"}],
               "data": {"peel": [{"revisions": ["workspace"]}], "img.png": [{"revisions": ["workspace"]}, {"revisions": ["main"]}]}}
    assert plot_problems(dropped) == ["main: DataIndexDirError: failed to load directory ('data', 'prune')",
                                      "peel: no main version"]
    assert plot_problems({}) == ["no plot could be drawn"]
    assert plot_problems({"data": {"peel": [{"revisions": ["workspace", "main"]}]}}) == []


def test_cli_writes_the_body_and_check_plots_exits_1(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps(DIFF))
    (tmp_path / "p.json").write_text("")                  # dvc params diff --json prints nothing when equal
    (tmp_path / "pl.json").write_text(json.dumps({"data": {"peel": [{"revisions": ["workspace"]}]}}))
    assert main(["body", "--metrics", str(tmp_path / "m.json"), "--params", str(tmp_path / "p.json"),
                 "--plots", str(tmp_path / "pl.json")]) == 0
    out = capsys.readouterr().out
    assert "| images | 900 | 1,200 | +300 |" in out and "**The plots diff is incomplete**" in out
    assert main(["check-plots", str(tmp_path / "pl.json")]) == 1
    assert "peel: no main version" in capsys.readouterr().err


PIPELINE = """stages:
  make:
    cmd: python make.py
    deps: [make.py]
    outs: [out]
    metrics:
      - metrics/summary.json:
          cache: false
plots:
  - out/curve.csv:
      x: x
      y: y
"""
MAKE = """import json, os
n = {n}
os.makedirs("out", exist_ok=True)
os.makedirs("metrics", exist_ok=True)
open("out/curve.csv", "w").write("x,y\\n" + "".join(f"{{i}},{{i * n}}\\n" for i in range(3)))
json.dump({{"size": {{"total": n}}}}, open("metrics/summary.json", "w"))
"""


@pytest.mark.slow
def test_main_plots_come_from_the_remote_or_the_check_fails(tmp_path):
    """What the workflow does: main's plot outs live in a dir out (DVC cache only); with them gone from the
    cache and the remote `dvc plots diff main` silently draws the PR alone, which check-plots catches;
    `dvc fetch -a --type plots` brings them into the cache (it covers top-level plots inside a dir out)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "test"], ["dvc", "init", "-q"],
                ["dvc", "remote", "add", "-d", "r", str(tmp_path / "remote")]):
        run(cmd, repo)
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "make.py").write_text(MAKE.format(n=1))
    run(["dvc", "repro", "-q"], repo)
    run(["dvc", "push", "-q"], repo)
    run("git add -A && git commit -qm main", repo)
    run(["git", "checkout", "-q", "-b", "pr"], repo)
    (repo / "make.py").write_text(MAKE.format(n=2))
    run(["dvc", "repro", "-q"], repo)
    run("git add -A && git commit -qm pr", repo)

    diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json", "main"], repo).stdout)
    assert headline_rows(diff) == [("images", "1", "2", "+1")]

    shutil.rmtree(repo / ".dvc/cache")                    # CI: a fresh clone holds the PR's outs only
    run(["dvc", "repro", "-q"], repo)
    (tmp_path / "remote").rename(tmp_path / "away")       # DVC reads a revision's outs from the remote too
    plots = json.loads(run(["dvc", "plots", "diff", "main", "--json"], repo).stdout)
    assert any(p.startswith("main: ") for p in plot_problems(plots))
    assert "workspace" in json.dumps(plots["data"])        # the PR's side alone, drawn without a word

    (tmp_path / "away").rename(tmp_path / "remote")
    run(["dvc", "fetch", "-q", "-a", "--type", "plots"], repo)
    (tmp_path / "remote").rename(tmp_path / "away")       # now from the cache alone
    plots = json.loads(run(["dvc", "plots", "diff", "main", "--json"], repo).stdout)
    assert plot_problems(plots) == []
