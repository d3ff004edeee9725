"""Wall time of the Ray-capable stages on the smoke data: PAS_ENGINE=local vs ray, and Ray's start-up.

    python benchmarks/engine.py [--repeats 2] [--stages ood dedup leakage generate pool] [--json out.json]

Runs `python stages/<stage>.py` on the inputs of the last `dvc repro` (data/, models/), outputs to a
temp dir (never data/), as a fresh process each time: `ood`, `dedup`, `leakage`, `generate` (from the
captions stage's out data/captions/, into a fresh scratch folder, so every run draws all shards; no
LLM runs) and `pool` (8k clipart; slow, not by default).
Modes:

- local:        PAS_ENGINE unset (the default, in-process loop);
- ray-fresh:    PAS_ENGINE=ray, no address: the stage starts its own local Ray (what a user gets);
- ray-cluster:  PAS_ENGINE=ray, PAS_RAY_ADDRESS=<a head started beforehand on 127.0.0.1>: a warm cluster,
                so the stage pays only for connecting and starting its actor pool.

Also times `ray.init()` alone and a model-free `map_shards` (actor-pool start-up) in a fresh process,
and checks every output byte of the ray runs against the local run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

ROOT = Path(__file__).resolve().parents[1]

STARTUP = r"""
import json, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(include_dashboard=False, configure_logging=False)
t2 = time.perf_counter()
from pas.engine import EngineConfig, map_shards
out = map_shards(lambda: (lambda x: x + 1), [0, 1], config=EngineConfig("ray"))
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
assert out == [1, 2]
print(json.dumps({"import_ray_s": t1 - t0, "ray_init_s": t2 - t1, "first_map_s": t3 - t2,
                  "shutdown_s": t4 - t3}))
"""


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


STAGES = ("ood", "dedup", "leakage", "generate", "pool")


def run_stage(stage: str, out: Path, env: dict) -> float:
    cmd = [sys.executable, f"stages/{stage}.py", "--out", str(out), "--metrics", str(out) + ".json",
           "--params", "params.yaml"]
    if stage == "generate":      # a fresh scratch folder: every shard is drawn
        cmd += ["--cache", str(out) + "-cache"]
    if stage == "dedup":         # compute every descriptor chunk (the scratch cache would resume them)
        cmd += ["--cache", ""]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stages", nargs="+", default=["ood", "dedup", "leakage", "generate"], choices=STAGES)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.test_engine_ray import _stop_cluster, start_cluster

    base = {k: v for k, v in os.environ.items() if not k.startswith(("PAS_RAY", "PAS_ENGINE", "RAY_ADDRESS"))}
    base["TQDM_DISABLE"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="pas-engine-bench-"))
    res: dict = {"machine": f"{platform.node()} {os.cpu_count()} cpus, load {os.getloadavg()}",
                 "runs": {st: {"local": [], "ray-fresh": [], "ray-cluster": []} for st in args.stages}}

    r = subprocess.run([sys.executable, "-c", STARTUP], cwd=ROOT, env=base, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    res["startup"] = json.loads(r.stdout.strip().splitlines()[-1])

    address, temp_dir = start_cluster(n_nodes=1, cpus_per_node=os.cpu_count() or 2)
    try:
        envs = {"local": base,
                "ray-fresh": {**base, "PAS_ENGINE": "ray"},
                "ray-cluster": {**base, "PAS_ENGINE": "ray", "PAS_RAY_ADDRESS": address,
                                "RAY_AUTH_MODE": "disabled"}}
        digests: dict = {st: {} for st in args.stages}
        for rep in range(args.repeats):
            for st in args.stages:
                for name, env in envs.items():       # interleaved, so machine load hits all modes alike
                    out = tmp / f"{st}-{name}-{rep}"
                    res["runs"][st][name].append(run_stage(st, out, env))
                    digests[st][name] = _digest(out)
                    print(f"{st} {name} #{rep}: {res['runs'][st][name][-1]:.1f} s", flush=True)
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    modes = ("ray-fresh", "ray-cluster")
    res["identical_to_local"] = {st: {k: d[k] == d["local"] for k in modes} for st, d in digests.items()}
    res["n_files"] = {st: len(d["local"]) for st, d in digests.items()}
    res["best_s"] = {st: {k: min(v) for k, v in r.items()} for st, r in res["runs"].items()}
    res["ratio_vs_local"] = {st: {k: b[k] / b["local"] for k in modes} for st, b in res["best_s"].items()}
    emit(res, args.json, indent=2)


if __name__ == "__main__":
    main()
