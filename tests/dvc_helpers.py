"""Run the real DVC pipeline in a throw-away copy of this repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "stages", "src", "configs", ".dvc/config", ".dvc/plots", ".dvcignore",
        "containers", "takedown.txt", "pools"]


def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
         "DVC_NO_ANALYTICS": "1", "PAS_CONTAINERS": "0", **(env or {})}
    # the venv's python and dvc first on PATH, as after `. .venv/bin/activate`
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    p = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def make_repo(dst: Path, params: dict | None = None) -> Path:
    """Copy the pipeline into `dst`, git init + commit, local remote inside dst; `params` overrides
    top-level keys / merges one level into sections."""
    dst.mkdir(parents=True, exist_ok=True)
    for rel in COPY:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dst / rel, symlinks=True,     # pools/openclipart stays a link
                            ignore=shutil.ignore_patterns("__pycache__", "*.sif"))
        elif src.exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    if params:
        set_params(dst, params)
    run(["git", "init", "-q"], dst)
    run(["git", "config", "user.email", "t@example.com"], dst)
    run(["git", "config", "user.name", "test"], dst)
    run(["dvc", "remote", "add", "-d", "-f", "local", str(dst.parent / f"{dst.name}-remote")], dst)
    (dst / ".gitignore").write_text("__pycache__/\n")
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "init"], dst)
    return dst


def set_params(repo: Path, overrides: dict) -> None:
    f = repo / "params.yaml"
    p = yaml.safe_load(f.read_text())
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(p.get(k), dict):
            p[k] = {**p[k], **v}
        else:
            p[k] = v
    f.write_text(yaml.safe_dump(p, sort_keys=False))


def ran_stages(output: str) -> list[str]:
    """Stage names DVC reports as run in a `dvc repro` / `dvc exp run` output."""
    out = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Running stage '"):
            out.append(line.split("'")[1])
    return out
