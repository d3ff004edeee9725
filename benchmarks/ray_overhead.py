"""Where Ray's fixed cost per stage goes: connect, Ray Data job start-up, plain core actors, torch import.

    python benchmarks/ray_overhead.py

Starts a private one-node head on 127.0.0.1 (2 CPUs, as `benchmarks/engine.py`'s ray-cluster mode), then
times in this process: connecting; two Ray Data jobs of 2 trivial items through `pas.engine.map_shards`
(an `ActorPoolStrategy(size=2)` pool, the first and a warm one) with the operators' own remote time
from `ds.stats()`; the same 2 items on 2 plain `@ray.remote` actors; a Ray Data job whose actors import
torch. Prints one JSON line. Results: benchmarks/RESULTS-engine.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.test_engine_ray import _stop_cluster, start_cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    address, temp_dir = start_cluster(n_nodes=1, cpus_per_node=2)
    res: dict = {}
    try:
        t = time.perf_counter()
        import ray
        res["import_ray_s"] = time.perf_counter() - t
        from pas.engine import EngineConfig, ensure_ray, map_shards

        t = time.perf_counter()
        ensure_ray(address)
        res["connect_s"] = time.perf_counter() - t
        cfg = EngineConfig("ray", ray_address=address)
        for name in ("data_job_first_s", "data_job_warm_s"):
            t = time.perf_counter()
            assert map_shards(lambda: (lambda x: x + 1), [0, 1], config=cfg) == [1, 2]
            res[name] = time.perf_counter() - t

        class Identity:
            def __call__(self, batch):
                return batch

        ds = ray.data.from_items([{"i": 0}, {"i": 1}], override_num_blocks=2).map_batches(
            Identity, batch_size=1, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
        t = time.perf_counter()
        assert len(list(ds.iter_rows())) == 2
        res["data_job_direct_s"] = time.perf_counter() - t
        walls = re.findall(r"Remote wall time: .*?([0-9.]+)(us|ms|s) total", ds.stats())
        res["operators_remote_wall_s"] = sum(float(v) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[u] for v, u in walls)

        @ray.remote(num_cpus=1)
        class Plain:
            def f(self, x):
                return x + 1

        t = time.perf_counter()
        actors = [Plain.remote() for _ in range(2)]
        assert ray.get([a.f.remote(i) for i, a in enumerate(actors)]) == [1, 2]
        for a in actors:
            ray.kill(a)
        res["plain_actors_s"] = time.perf_counter() - t

        def with_torch():
            import torch  # noqa: F401

            return lambda x: x

        t = time.perf_counter()
        map_shards(with_torch, [0, 1], config=cfg)
        res["data_job_torch_import_s"] = time.perf_counter() - t
        ray.shutdown()
    finally:
        _stop_cluster(temp_dir)
    print(json.dumps({k: round(v, 3) for k, v in res.items()}))


if __name__ == "__main__":
    main()
