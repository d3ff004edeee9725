"""Helpers for tests that run a DVC stage script in-process (stages/ is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

STAGES = Path(__file__).resolve().parents[1] / "stages"


def load_stage(name: str):
    """stages/<name>.py as a fresh module, so a test can call its main(argv) or patch its globals."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def outputs(root: Path) -> dict[str, bytes]:
    """Every file below `root` by relative path: compare two runs' outputs byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
