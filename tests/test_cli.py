"""The `pas` command: `pas check` before a run, `pas summary` after it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pas.cli import main
from pas.io.manifest import write_metrics

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path, **changes) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pool = tmp_path / "pool" / "food"
    pool.mkdir(parents=True)
    params["pool"]["source"] = str(tmp_path / "pool")
    params["eval"]["root"] = str(pool)
    params["eval"]["sets"][0]["path"] = str(pool)
    for dotted, v in changes.items():
        node = params
        *head, last = dotted.split("__")
        for k in head:
            node = node[k]
        node[last] = v
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def test_check_passes_on_a_valid_project(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path))
    assert main(["check"]) == 0
    assert capsys.readouterr().out.strip() == "params.yaml: ok (params valid, inputs present)"


def test_check_names_the_misspelt_key_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path, dedup__batch_sise=8))
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_sise" in err[0] and "batch_size" in err[0]


def test_check_reports_missing_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path))
    shutil.rmtree(tmp_path / "pool")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "pool.source=" in err and "no such folder" in err and "eval.sets[0] (clipart_food)" in err


def test_check_reports_a_missing_clipn_checkpoint(tmp_path, monkeypatch, capsys):
    clipn = {"kind": "clipn", "base": {"kind": "open_clip", "name": "ViT-B-16", "pretrained": "openai"},
             "checkpoint": {"path": str(tmp_path / "epoch_10.pt")}}
    monkeypatch.chdir(_project(tmp_path, models__clipn=clipn))
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"models.clipn.checkpoint.path={str(tmp_path / 'epoch_10.pt')!r}: no such file"
    (tmp_path / "epoch_10.pt").write_bytes(b"x")
    assert main(["check"]) == 0


def test_check_lists_pool_entries_that_break_dvc_hashing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path))
    (tmp_path / "pool" / "food" / "loop").symlink_to("loop")
    assert main(["check"]) == 1
    assert "symlink_loop: food/loop" in capsys.readouterr().out


def test_summary_and_python_dash_m(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["summary"]) == 2 and "no summary yet" in capsys.readouterr().err
    write_metrics(tmp_path / "metrics" / "summary.json",
                  {"size": {"total": 3, "real": 2, "synthetic": 1}, "funnel": {"retrieve": 2}, "top1": {}})
    assert main(["summary"]) == 0
    assert capsys.readouterr().out.startswith("pas: data/dataset: 3 images (2 real, 1 synthetic)")
    r = subprocess.run([sys.executable, "-m", "pas", "summary"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "3 images" in r.stdout
