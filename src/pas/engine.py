"""Where the heavy, shard-parallel work of a stage runs: in this process (`local`) or on Ray Data (`ray`).

The engine is machine configuration, not a dataset parameter: it is read from the environment, never
from params.yaml, so switching it changes neither an output byte nor what DVC reruns.

    PAS_ENGINE                  local (default) | ray
    PAS_RAY_ADDRESS             "" (default): start a local Ray; "auto" or "host:port" or "ray://host:port":
                                join an existing cluster (`ray start --head` on the allocation)
    PAS_RAY_ACTORS              actors in the pool; default: as many as the cluster's GPUs / CPUs allow
    PAS_RAY_NUM_GPUS_PER_ACTOR  GPUs each actor holds (default 0; 1 on a GPU node, 0.5 to pack two)
    PAS_RAY_CPUS_PER_ACTOR      CPUs each actor holds; default: 1 for GPU actors, else the cluster's CPUs
                                shared out among the actors (at most one node's worth), so that fewer
                                items than CPUs still use every core (torch takes its thread count from it)

`map_shards(fn_factory, items)` is the one entry point. `fn_factory()` loads the models and returns
`fn(item) -> result`; locally it is called once, in-process, and the items are mapped in a plain loop.
With Ray, `ray.data.from_items(items).map_batches(_ShardActor, compute=ActorPoolStrategy(size=N),
batch_size=1)` (`concurrency=N` before Ray 2.51) runs an actor pool: each actor calls `fn_factory()`
once in `__init__` (the model is loaded once per actor), takes one item at a time, and Ray Data restarts
a dead actor and retries its item (its defaults for actor pools: max_restarts=-1, max_task_retries=-1).
Results come back in input order either way, and `on_result(i, result)` is called in this process as
each item finishes, so a stage writes its per-shard resume marker as soon as a shard is done.

Items carry paths, not pixels: every Ray node must see the repository (data/, models/) at the same path
(a shared filesystem, as on a Slurm cluster) and have `pas` installed; only this process writes outputs.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger("pas.engine")

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineConfig:
    engine: str = "local"
    ray_address: str = ""              # "" = start a local Ray
    actors: int = 0                    # 0 = from the cluster's resources
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.0        # 0 = 1 for GPU actors, else shared out (`_pool_shape`)

    @classmethod
    def from_env(cls, env: dict | None = None) -> "EngineConfig":
        env = os.environ if env is None else env
        engine = env.get("PAS_ENGINE", "").strip().lower() or "local"
        if engine not in ENGINES:
            raise ValueError(f"PAS_ENGINE={engine!r}: expected one of {', '.join(ENGINES)}")
        actors = env.get("PAS_RAY_ACTORS", "").strip() or "0"
        gpus = env.get("PAS_RAY_NUM_GPUS_PER_ACTOR", "").strip() or "0"
        cpus = env.get("PAS_RAY_CPUS_PER_ACTOR", "").strip() or "0"
        try:
            n_actors, n_gpus, n_cpus = int(actors), float(gpus), float(cpus)
        except ValueError:
            raise ValueError(f"PAS_RAY_ACTORS={actors!r} must be an integer, PAS_RAY_NUM_GPUS_PER_ACTOR="
                             f"{gpus!r} and PAS_RAY_CPUS_PER_ACTOR={cpus!r} numbers") from None
        if n_actors < 0 or n_gpus < 0 or n_cpus < 0:
            raise ValueError("PAS_RAY_ACTORS, PAS_RAY_NUM_GPUS_PER_ACTOR and PAS_RAY_CPUS_PER_ACTOR must be ≥ 0")
        return cls(engine=engine, ray_address=env.get("PAS_RAY_ADDRESS", "").strip(),
                   actors=n_actors, num_gpus_per_actor=n_gpus, cpus_per_actor=n_cpus)


def _pool_size(config: EngineConfig, n_items: int, resources: dict) -> int:
    """Actors to start: PAS_RAY_ACTORS, else what the cluster holds (GPUs / per-actor GPUs, or CPUs /
    per-actor CPUs when set), never more than the items and never fewer than one."""
    if config.actors:
        n = config.actors
    elif config.num_gpus_per_actor > 0:
        n = int(resources.get("GPU", 0) // config.num_gpus_per_actor)
    else:
        n = int(resources.get("CPU", 1) // (config.cpus_per_actor or 1))
    return max(1, min(n, n_items))


def _pool_shape(config: EngineConfig, n_items: int, resources: dict,
                node_cpus: Sequence[float]) -> tuple[int, float]:
    """(actors, CPUs per actor). CPU actors share the cluster's CPUs out, whole CPUs, at most the
    largest node's (an actor lives on one node): 1 item on an 8-CPU node gets one 8-CPU actor, not one
    1-CPU actor next to 7 idle cores (Ray sets the actor's OMP/torch threads from its CPUs). GPU actors
    hold 1 CPU unless PAS_RAY_CPUS_PER_ACTOR says otherwise."""
    n = _pool_size(config, n_items, resources)
    if config.cpus_per_actor:
        return n, config.cpus_per_actor
    if config.num_gpus_per_actor > 0:
        return n, 1.0
    per = int(resources.get("CPU", 1) // n)
    return n, float(max(1, min(per, int(max(node_cpus, default=1)))))


def ensure_ray(address: str = "") -> None:
    """Connect to Ray once per process: join `address` ("auto", "host:port", "ray://…"), or, with "",
    start a local instance (what `ray.init()` does when RAY_ADDRESS is unset)."""
    # no usage reporting to Ray's servers unless the user opts in: GPU clusters are often offline,
    # and the reporter's failed connections end up as tracebacks in the stage log
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
             configure_logging=False)
    # Ray's own exit hook sleeps for late worker logs and waits for Ray Data's threads (cost in
    # benchmarks/RESULTS-engine.md); ours runs first (atexit is LIFO), once every result is back
    atexit.register(ray.shutdown)
    log.info("ray: %s, resources %s", address or "local instance", ray.cluster_resources())


class _ShardActor:
    """Ray Data actor: loads the models once (`fn_factory()`), then maps one item per call."""

    def __init__(self, factory_blob: bytes):
        import cloudpickle

        self.fn = cloudpickle.loads(factory_blob)()

    def __call__(self, batch: dict) -> dict:
        import cloudpickle
        import numpy as np

        out = [cloudpickle.dumps(self.fn(cloudpickle.loads(bytes(b)))) for b in batch["item"]]
        return {"i": np.asarray(batch["i"], np.int64), "result": np.array(out, dtype=object)}


def map_shards(fn_factory: Callable[[], Callable[[Any], Any]], items: Sequence[Any], *,
               config: EngineConfig | None = None,
               on_result: Callable[[int, Any], None] | None = None, desc: str = "shards",
               progress: bool = True) -> list:
    """[fn(item) for item in items] with `fn = fn_factory()`, on the engine of `config` (default: env).

    Items, `fn_factory` and results must pickle (cloudpickle) for `ray`. `on_result(i, result)` runs in
    the calling process as each item finishes (in completion order with Ray). Returns results in
    input order.
    """
    config = EngineConfig.from_env() if config is None else config
    items = list(items)
    results: list = [None] * len(items)
    if not items:
        return results
    if config.engine == "local":
        from tqdm import tqdm

        fn = fn_factory()
        for i, item in enumerate(tqdm(items, desc=desc, unit="shard", disable=not progress)):
            results[i] = fn(item)
            if on_result is not None:
                on_result(i, results[i])
        return results

    import cloudpickle
    import ray

    ensure_ray(config.ray_address)
    node_cpus = [float(nd.get("Resources", {}).get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")]
    n_actors, n_cpus = _pool_shape(config, len(items), ray.cluster_resources(), node_cpus)
    rows = [{"i": i, "item": cloudpickle.dumps(item)} for i, item in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # one shard in flight per actor: a shard is minutes of GPU work, queueing more on a busy actor
    # would starve the idle ones
    pool = ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=1)
    ds = ds.map_batches(_ShardActor, fn_constructor_kwargs={"factory_blob": cloudpickle.dumps(fn_factory)},
                        batch_size=1, batch_format="numpy", compute=pool, num_cpus=n_cpus,
                        num_gpus=config.num_gpus_per_actor or None)
    log.info("%s: %d items on %d Ray actors (%g CPU, %g GPU each)", desc, len(items), n_actors, n_cpus,
             config.num_gpus_per_actor)
    done = [False] * len(items)
    for row in ds.iter_rows():
        i = int(row["i"])
        if done[i]:          # an item retried after its first result came back: keep the first
            continue
        results[i], done[i] = cloudpickle.loads(bytes(row["result"])), True
        if on_result is not None:
            on_result(i, results[i])
    if not all(done):
        missing = [i for i, d in enumerate(done) if not d]
        raise RuntimeError(f"{desc}: Ray returned no result for items {missing[:5]}")
    return results


def map_resumable(fn_factory: Callable[[], Callable[[Any], Any]], items: Sequence[Any], ids: Sequence[Any],
                  store, *, config: EngineConfig | None = None,
                  on_result: Callable[[int, Any], None] | None = None, desc: str = "shards",
                  progress: bool = True) -> list:
    """`map_shards` that keeps each finished item's result in `store` (`get(id)` → result or None,
    `put(id, result)`: `pas.io.resume.WorkStore`), so a killed run's rerun computes only the
    items it had not finished. `ids[i]` is item i's input identity: the content hash of what it reads
    (`pas.io.resume.chunk_identity`), never a path or mtime. `on_result(i, result)` runs for each item
    computed by this run, after it is stored. `store=None` maps everything."""
    items = list(items)
    if store is None:
        return map_shards(fn_factory, items, config=config, on_result=on_result, desc=desc, progress=progress)
    results = [store.get(ids[i]) for i in range(len(items))]
    todo = [i for i, r in enumerate(results) if r is None]
    if len(todo) < len(items):
        log.info("%s: %d of %d items resumed", desc, len(items) - len(todo), len(items))

    def done(j: int, result: Any) -> None:
        results[todo[j]] = result
        store.put(ids[todo[j]], result)
        if on_result is not None:
            on_result(todo[j], result)

    map_shards(fn_factory, [items[i] for i in todo], config=config, on_result=done, desc=desc,
               progress=progress)
    return results
