"""A failing stage never deletes git-tracked files. DVC deletes a stage's outs before running it, and a
`cache: false` out (metrics, dvclive curves, plot CSVs, committed to git) cannot come back from the
DVC cache, so dvc.yaml marks every one `persist: true` and stages write them only once they succeeded."""

from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image

from tests.dvc_helpers import make_repo, ran_stages, run, set_params

ROOT = Path(__file__).resolve().parents[1]


def _outs(st: dict):
    for kind in ("outs", "metrics", "plots"):
        for o in st.get(kind, []):
            yield (o, {}) if isinstance(o, str) else next(iter(o.items()))


def test_every_git_tracked_out_is_persist():
    for name, st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        st = st["do"] if "foreach" in st else st
        for path, opts in _outs(st):
            if opts.get("cache") is False:
                assert opts.get("persist") is True, f"{name}: {path} is git-tracked but not persist: true"


def test_a_failing_stage_leaves_git_tracked_outputs_in_place(tmp_path):
    imgs = tmp_path / "imgs"
    for c, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (imgs / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (24 + i, 24), colour).save(imgs / c / f"{i}.png")
    sets = [{"name": "tiny", "kind": "imagefolder", "path": str(imgs), "classes": ["blue", "red"],
             "test_fraction": 0.3, "min_per_class": 2}]
    repo = make_repo(tmp_path / "repo", {"eval": {"root": str(imgs), "sets": sets}})
    assert ran_stages(run(["dvc", "repro", "evalsets"], repo).stdout) == ["params", "evalsets"]
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "evalsets"], repo)
    before = (repo / "metrics/evalsets.json").read_bytes()

    # valid params (the check passes), but the stage fails once it runs: a class that is not there
    set_params(repo, {"eval": {"sets": [{**sets[0], "classes": ["blue", "green"]}]}})
    p = run(["dvc", "repro", "evalsets"], repo, check=False)
    assert p.returncode != 0 and ran_stages(p.stdout) == ["params", "evalsets"], p.stdout + p.stderr
    assert "classes ['green'] not found" in p.stdout + p.stderr
    assert run(["git", "status", "--porcelain", "metrics"], repo).stdout == ""
    assert (repo / "metrics/evalsets.json").read_bytes() == before
