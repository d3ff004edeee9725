"""docs/ARCHITECTURE.md's stage table is generated from dvc.yaml and must not be stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_stage_table_is_what_dvc_yaml_says():
    r = subprocess.run([sys.executable, "scripts/architecture.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for name in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        assert f"| `{name}" in page, name


def test_check_fails_on_a_stale_table(tmp_path):
    page = tmp_path / "ARCHITECTURE.md"
    page.write_text((ROOT / "docs" / "ARCHITECTURE.md").read_text().replace("| `pool` |", "| `pol` |"))
    r = subprocess.run([sys.executable, "scripts/architecture.py", "--check", "--page", str(page)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stderr
