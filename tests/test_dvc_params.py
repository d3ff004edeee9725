"""params.yaml is checked whole before any stage runs: dvc.yaml's `params` stage, which every other
stage depends on (its output never changes), under a real `dvc repro` / `dvc exp run` in a temp repo."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

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


def test_every_eval_set_folder_must_be_an_evalsets_dep(tmp_path, capsys):
    from tests.stage_helpers import load_stage

    check = load_stage("check_params")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    two = {**base, "eval": {**base["eval"], "sets": base["eval"]["sets"] + [
        {**base["eval"]["sets"][0], "name": "second", "path": str(tmp_path)}]}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(two))
    argv = ["--params", str(params), "--out", str(tmp_path / "ok"), "--dvc-yaml", str(ROOT / "dvc.yaml")]
    assert check.run_stage(lambda: check.main(argv)) == 2
    assert capsys.readouterr().err == (
        f"params error: eval.sets[1] (second): its folder {tmp_path} is not a dep of the evalsets stage; put "
        f"it under eval.root ({base['eval']['root']}) or add `- ${{eval.sets[1].path}}` to its deps in dvc.yaml\n")
    assert not (tmp_path / "ok").exists()
    # with the line added (templated, or the literal folder) the check passes
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for dep in ("${eval.sets[1].path}", str(tmp_path)):
        dvc["stages"]["evalsets"]["deps"] = dvc["stages"]["evalsets"]["deps"] + [dep]
        (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc))
        assert check.main([*argv[:-1], str(tmp_path / "dvc.yaml")]) == 0
        assert (tmp_path / "ok").read_text() == check.OK
        dvc["stages"]["evalsets"]["deps"].pop()
    # the repo's own params.yaml passes with the repo's dvc.yaml
    assert check.main(["--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "ok2"),
                       "--dvc-yaml", str(ROOT / "dvc.yaml")]) == 0
    # a set inside eval.root (relative path) needs no line of its own
    under = {**two, "eval": {**two["eval"], "root": str(tmp_path)}}
    under["eval"]["sets"] = [{**s, "path": "sub"} if s["name"] == "second" else s for s in under["eval"]["sets"]]
    under["eval"]["sets"][0] = {**under["eval"]["sets"][0], "path": str(tmp_path / "first")}
    params.write_text(yaml.safe_dump(under))
    assert check.main(argv) == 0


@pytest.mark.parametrize("preset", ["paper-food", "paper-birds"])
def test_paper_presets_eval_sets_are_all_evalsets_deps(tmp_path, preset):
    """The presets have three eval sets each (the paper's test sets for leakage) and one dvc.yaml."""
    from tests.stage_helpers import load_stage

    check = load_stage("check_params")
    cfg = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
    assert len(cfg["eval"]["sets"]) == 3
    assert check.main(["--params", str(ROOT / "configs" / f"{preset}.yaml"), "--out", str(tmp_path / "ok"),
                       "--dvc-yaml", str(ROOT / "dvc.yaml")]) == 0


# machine knobs: settings of how a stage runs that leave every output byte alike, so a change must not
# rerun the stage. The others (device, batch sizes, thread counts) stay declared: they change float
# rounding (CPU vs GPU kernels, batch composition, reduction order), which the stages' own resume
# fingerprints record too. The pool's decode processes are one as well: not a param at all but
# PAS_POOL_WORKERS, machine configuration from the environment like PAS_ENGINE (tests/test_pool.py).
KNOBS = {"prune": {"sort_buffer_mb"}}


def test_prune_declares_every_param_but_its_machine_knob_by_exact_key():
    import dataclasses

    from pas.curate.prune import PruneParams
    from pas.params import PAPER_KEYS

    declared = set(_stages()["prune"]["params"])
    fields = {f.name for f in dataclasses.fields(PruneParams)}
    # + `domain`: the dataset card names the domain
    assert declared == {f if f in PAPER_KEYS else f"prune.{f}" for f in fields - KNOBS["prune"]} | {"domain"}
    for preset in ("params.yaml", "configs/paper-food.yaml", "configs/paper-birds.yaml"):
        p = yaml.safe_load((ROOT / preset).read_text())   # DVC needs every declared key in the file
        assert {k for k in declared if k.startswith("prune.")} <= {f"prune.{k}" for k in p["prune"]}, preset


def test_a_machine_knob_leaves_the_outputs_byte_identical(tmp_path):
    """prune with 1 MB of RAM for kept images (spills sorted runs to disk) vs 1 GB: same bytes out."""
    import json

    import numpy as np

    from pas.io.manifest import write_parquet
    from pas.io.shards import ShardWriter, encode_image
    from tests.helpers import read_run
    from tests.stage_helpers import load_stage, outputs
    from tests.test_prune import _scores_for

    rng = np.random.default_rng(0)
    dirs, keys = [], []
    for name, src, prefix in (("retrieved", "real", "p"), ("generated", "synthetic", "g")):
        with ShardWriter(tmp_path / name, prefix="shard", maxcount=8) as w:
            for i in range(20):   # noise PNGs of ~75 kB: 40 of them overflow a 1 MB buffer
                img = Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))
                w.write(f"{prefix}{i:04d}", encode_image(img, "png"), {"source": src}, ext="png")
                keys.append(f"{prefix}{i:04d}")
        write_parquet(pd.DataFrame(w.rows), tmp_path / name / "index.parquet")
        dirs.append(str(tmp_path / name))
    write_parquet(_scores_for(keys, 1), tmp_path / "scores.parquet")
    (tmp_path / "metrics").mkdir()
    for m in ("dedup", "leakage"):
        (tmp_path / "metrics" / f"{m}.json").write_text(json.dumps({"n_out": 40}))
    prune = load_stage("prune")
    runs = {}
    for mb in (1, 1024):
        (tmp_path / "params.yaml").write_text(f"seed: 0\nprune:\n  stop: target_size\n  target_size: 30\n"
                                              f"  sort_buffer_mb: {mb}\n")
        out = tmp_path / f"mb{mb}"
        assert prune.main(["--scores", str(tmp_path / "scores.parquet"), "--images", *dirs,
                           "--metrics-dir", str(tmp_path / "metrics"), "--out", str(out / "dataset"),
                           "--prune-dir", str(out / "prune"), "--metrics", str(out / "prune.json"),
                           "--dataset-metrics", str(out / "dataset.json"), "--params", str(tmp_path / "params.yaml"),
                           "--no-progress"]) == 0
        runs[mb] = read_run(out / "prune.json")["n_sort_runs"]
        assert outputs(out / "dataset") and outputs(out / "prune")
    assert runs[1] > 0 and runs[1024] == 0          # the knob did change how the stage ran
    for d in ("dataset", "prune"):                  # ... and none of the DVC outs
        assert outputs(tmp_path / "mb1" / d) == outputs(tmp_path / "mb1024" / d), d
    for m in ("dataset.json", "prune.json"):        # ... nor any tracked metric
        assert outputs(tmp_path / "mb1")[m] == outputs(tmp_path / "mb1024")[m], m


def test_dvc_plots_output_is_git_ignored():
    import subprocess

    # `dvc plots show` writes dvc_plots/ in the repo root; it must never be committed by `git add -A`
    p = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT)
    assert p.returncode == 0


@pytest.mark.parametrize("preset", ["paper-food", "paper-birds"])
def test_service_presets_depend_on_no_missing_pool_folder(preset):
    """The presets retrieve through a kNN service: every `${pool.source}` dep in dvc.yaml (pool and the
    pool_models group) names a path that exists in the checkout, the configs/no-pool placeholder."""
    from pas.params import _interpolate

    cfg = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
    assert cfg["retrieve"]["backend"] == "clip_service"
    text = (ROOT / "dvc.yaml").read_text()
    assert text.count("${pool.source}") == 2
    path = ROOT / _interpolate("${pool.source}", cfg)
    assert path == ROOT / "configs" / "no-pool" and path.is_dir()


def test_a_service_profile_with_a_missing_pool_source_is_refused(tmp_path, capsys):
    from tests.stage_helpers import load_stage

    check = load_stage("check_params")
    cfg = yaml.safe_load((ROOT / "configs" / "paper-food.yaml").read_text())
    cfg["pool"]["source"] = "/data/pas/pool-that-is-not-here"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "ok"),
            "--dvc-yaml", str(ROOT / "dvc.yaml")]
    assert check.run_stage(lambda: check.main(argv)) == 2
    assert capsys.readouterr().err == (
        "params error: pool.source='/data/pas/pool-that-is-not-here' does not exist: with retrieve.backend "
        "clip_service nothing reads it, but dvc.yaml's pool stage depends on it; set pool.source: "
        "configs/no-pool (a placeholder)\n")
    assert not (tmp_path / "ok").exists()


def test_input_folders_outside_the_repo_are_named_and_the_default_has_none(tmp_path):
    from pas.params import load, outside_repo_deps

    # DVC names a dep outside the repo `../../x` in the workspace and `x` in a commit, so `dvc exp show`
    # shows it as changed on every row: the default links its pool in (pools/openclipart)
    assert outside_repo_deps(load(ROOT / "params.yaml"), ROOT) == []
    assert (ROOT / "pools" / "openclipart").is_symlink()
    cfg = {"pool": {"source": "/srv/pool"}, "eval": {"root": str(tmp_path / "ev"),
                                                      "sets": [{"path": "a"}, {"path": "/srv/sets/b"}]}}
    lines = outside_repo_deps(cfg, tmp_path)
    assert [line.split("=", 1)[0] for line in lines] == ["pool.source", "eval.sets[1].path"]
    assert lines[0] == ("pool.source='/srv/pool' is outside the repository: `dvc exp show` shows it as a changed "
                        "dep between revisions; link it in (ln -s /srv/pool pools/<name>) and name the link")


def test_the_params_stage_warns_about_an_outside_pool(tmp_path, caplog):
    from tests.stage_helpers import load_stage

    check = load_stage("check_params")
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg["pool"]["source"] = "/usr/share/openclipart/png"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "ok"),
            "--dvc-yaml", str(ROOT / "dvc.yaml")]
    with caplog.at_level("WARNING"):
        assert check.main(argv) == 0
    assert [r.getMessage().split("=")[0] for r in caplog.records] == ["pool.source"]
