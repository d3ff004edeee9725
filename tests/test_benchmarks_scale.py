"""benchmarks/scale.py runs every step at tiny sizes and reports each one (so the script can't rot)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"


def test_scale_benchmark_all_steps(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "300", "900", "--inline", "--root", str(tmp_path / "d"),
                        "--test", "64", "--concepts", "32", "--dim", "64", "--ood-dim", "64", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    sys.path.insert(0, str(SCRIPT.parent))
    from scale import STEPS

    rows = json.loads(out.read_text())["rows"]
    assert {(x["step"], x["n"]) for x in rows} == {(s, n) for s in STEPS for n in (300, 900)}
    assert all(x["seconds"] >= 0 and x["peak_rss_mb"] >= x["rss_before_mb"] > 0 for x in rows)
    table = r.stdout[r.stdout.index("| step | sizes |"):]
    for step in STEPS:                       # one exponent row per step
        assert f"| {step} | 300, 900 |" in table
    assert not (tmp_path / "d").exists()     # the data are deleted at the end
