"""Shared fixtures: tiny seeded models built once per session, small real clipart samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach for a hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # ray clusters the tests start: no phoning home

REPO = Path(__file__).resolve().parents[1]
CLIPART = Path("/usr/share/openclipart/png")


# the longest tests, by their recorded durations (`--durations`): they start first
LONGEST = ("tests/test_e2e.py::test_full_pipeline_offline", "tests/test_paper_rehearsal.py")


def pytest_collection_modifyitems(config, items):
    """Longest first, then the other end-to-end (slow) tests, then the rest: under xdist
    (`-n auto --dist worksteal`, pyproject.toml) the longest test then starts at once on one worker
    while the others share the rest, instead of starting last and bounding the suite's wall time."""
    def rank(item) -> int:
        if item.nodeid.startswith(LONGEST):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from pas.models.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "clip", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    from pas.models.clip import load_clip

    return load_clip(tiny_clip_dir)


@pytest.fixture(scope="session")
def clipart_food() -> list[Path]:
    """Real PNGs from Debian openclipart-png (installed by .ci/run)."""
    if not CLIPART.is_dir():
        pytest.fail("openclipart-png is not installed: apt-get install openclipart-png")
    files = sorted((CLIPART / "food").rglob("*.png"))
    assert len(files) > 300
    return files


def _tracked_outputs() -> dict[str, bytes]:
    """The pipeline results committed to git (dvc.lock, metrics, plots data, dvclive curves)."""
    import subprocess

    try:
        names = subprocess.run(["git", "ls-files", "dvc.lock", "metrics", "data", "dvclive"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {n: (REPO / n).read_bytes() for n in names if (REPO / n).is_file()}


@pytest.fixture(scope="session", autouse=True)
def repository_results_untouched():
    """Tests run stages with temp outputs; one that falls back to a default path (data/…, metrics/…)
    would silently overwrite the committed results. Fail the session if any of them changed."""
    before = _tracked_outputs()
    yield
    after = _tracked_outputs()
    changed = sorted(n for n in before if after.get(n) != before[n])
    assert not changed, f"tests modified committed pipeline results: {changed}"


@pytest.fixture(autouse=True)
def stage_logging():
    """What `pas.params.run_stage` sets up for a stage run by DVC (pas at INFO), for tests that call a
    stage's `main()` directly; restored after each test."""
    import logging

    pas_log = logging.getLogger("pas")
    level = pas_log.level
    pas_log.setLevel(logging.INFO)
    yield
    pas_log.setLevel(level)
