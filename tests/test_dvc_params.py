"""params.yaml is checked whole before any stage runs: dvc.yaml's `params` stage, which every other
stage depends on (its output never changes), under a real `dvc repro` / `dvc exp run` in a temp repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pas.params import SECTIONS
from tests.dvc_helpers import make_repo, ran_stages, run

ROOT = Path(__file__).resolve().parents[1]
GATE = "data/params.ok"


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_the_params_check():
    stages = _stages()
    for name, st in stages.items():
        if name != "params":
            deps = (st["do"] if "foreach" in st else st)["deps"]
            assert GATE in deps, f"stage {name} does not depend on {GATE}: it could run before the check"
    validators = {"src/" + t.partition(":")[0].replace(".", "/") + ".py" for t in SECTIONS.values()}
    assert set(stages["params"]["deps"]) == {"params.yaml", "stages/check_params.py", "src/pas/params.py"} | validators
    assert stages["params"]["outs"] == [GATE]


def _out(p) -> str:
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("dvc") / "repo")


def test_a_top_level_typo_stops_dvc_repro_before_any_stage(repo):
    params = repo / "params.yaml"
    good = params.read_text()
    params.write_text(good.replace("lambda_dup:", "lamda_dup:"))
    try:
        p = run(["dvc", "repro"], repo, check=False)
    finally:
        params.write_text(good)
    assert p.returncode != 0
    assert ran_stages(p.stdout) == ["params"], _out(p)
    assert "params error: lamda_dup: unknown top-level key; did you mean `lambda_dup`?" in _out(p)
    assert "Traceback" not in _out(p)
    assert not (repo / "models").exists() and not (repo / "metrics").exists()


@pytest.mark.parametrize("override,msg", [
    ("+lamda_dup=0.5", "lamda_dup: unknown top-level key; did you mean `lambda_dup`?"),
    ("+pool.max_pixel=5", "pool.max_pixel: unknown key; did you mean `pool.max_pixels`?"),
    ("pretrain.lr=nan", "pretrain.lr=nan must be a finite number"),
])
def test_dvc_exp_run_set_param_is_checked_before_any_stage(repo, override, msg):
    try:
        p = run(["dvc", "exp", "run", "-S", override], repo, check=False)
    finally:
        run(["git", "checkout", "--", "params.yaml"], repo)
    assert p.returncode != 0
    assert ran_stages(p.stdout) == ["params"], _out(p)
    assert f"params error: {msg}" in _out(p)
