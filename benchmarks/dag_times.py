"""Wall time of every stage of a full offline `dvc repro`, in a fresh copy of this repository.

    python benchmarks/dag_times.py [--out benchmarks/RESULTS-dag.md] [--lock-out FILE]

Streams `dvc repro` and timestamps each "Running stage" line, so a stage's time includes its
Python start-up and model loading, as a user experiences it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dvc_helpers import make_repo  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/RESULTS-dag.md")
    ap.add_argument("--lock-out", help="also copy the fresh run's dvc.lock here (to compare its outs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "repo")
        env = {**os.environ, "PAS_CONTAINERS": "0", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        t0 = time.time()
        marks: list[tuple[str, float]] = []
        p = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.time()))
        rc = p.wait()
        end = time.time()
        if args.lock_out and not rc:
            Path(args.lock_out).write_bytes((repo / "dvc.lock").read_bytes())
    if rc:
        print(f"dvc repro failed ({rc})", file=sys.stderr)
        return rc
    rows = [(name, (marks[i + 1][1] if i + 1 < len(marks) else end) - t) for i, (name, t) in enumerate(marks)]
    lines = ["# Full offline `dvc repro` — wall time per stage", "",
             f"Command: `python benchmarks/dag_times.py` on {platform.node() or 'this machine'} "
             f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}. Fresh copy of the repo, default params.yaml.",
             "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {n} | {s:.1f} |" for n, s in rows]
    lines += [f"| **total** (`dvc repro` wall) | **{end - t0:.1f}** |", ""]
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
