"""`dvc plots show` works offline: scripts/offline_plots_template.py (run by install.sh where npm is
installed) writes .dvc/plots/offline.html, a page with Vega inlined (DVC's own loads it from a CDN), and
points .dvc/config.local at it; the funnel plot keeps pipeline order (.dvc/plots/funnel.json).
Run with the real DVC in a throw-away repo; where Chromium is installed, the page is also rendered."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.dvc_helpers import run

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc/plots/offline.html"


def _template() -> Path:
    if not TEMPLATE.is_file():
        pytest.skip("no .dvc/plots/offline.html: npm was not there for scripts/offline_plots_template.py")
    return TEMPLATE


def test_the_offline_template_is_configured_and_self_contained():
    page = _template().read_text()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config.local")
    assert cfg["plots"]["html_template"] == "plots/offline.html"
    assert "{plot_divs}" in page and "{scripts}" not in page      # DVC adds its CDN tags only at {scripts}
    assert "<script src" not in page and page.count("<script>") == 3
    assert not (ROOT / ".dvc/config").read_text().count("html_template")   # generated: not in git


def test_the_funnel_keeps_pipeline_order():
    funnel = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    spec = next(p["dataset funnel"] for p in funnel if isinstance(p, dict) and "dataset funnel" in p)
    assert spec["template"] == "funnel"
    sort = json.loads((ROOT / ".dvc/plots/funnel.json").read_text())["encoding"]["y"]["sort"]
    assert sort["field"] == "step"


def test_dvc_plots_show_needs_no_network(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    _template()
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    shutil.copy(ROOT / ".dvc/config.local", repo / ".dvc/config.local")
    plots = [p for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
             if isinstance(p, dict) and "dataset funnel" in p]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    csv = repo / "data/prune/funnel.csv"       # as stages/prune.py writes it, in pipeline order
    csv.parent.mkdir(parents=True)
    csv.write_text("step,stage,images,real,synthetic\n0,retrieve,300,300,\n1,generate,160,,160\n"
                   "2,dedup,420,260,160\n3,leakage,400,240,160\n4,ood,400,240,160\n5,prune,350,200,150\n")
    run(["git", "init", "-q"], repo)
    run(["dvc", "plots", "show", "-o", str(tmp_path / "out")], repo)
    page = (tmp_path / "out/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src" not in page and "vegaEmbed" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on PATH: the page was checked as text only")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--virtual-time-budget=5000", "--window-size=900,600", f"--screenshot={shot}",
                    (tmp_path / "out/index.html").as_uri()], check=True, capture_output=True, timeout=120)
    a = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for rgb in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):     # real and synthetic bars: Vega ran
        assert (np.abs(a - rgb).sum(-1) < 30).sum() > 500, rgb
