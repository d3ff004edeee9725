"""pas.engine: the local/ray execution setting, and the `ood` stage on a real two-node Ray cluster.

The slow tests start a Ray head and one extra worker node on 127.0.0.1 (`ray start`, one CPU each, a
private temp dir), run the `ood` stage with PAS_ENGINE=local and =ray on the tiny inputs of
tests/test_ood.py, and compare every output byte; one of them SIGKILLs a Ray actor mid-shard. The cluster
is stopped by killing the processes that carry its private temp dir (not `ray stop`, which would stop
every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pas.engine import EngineConfig, _pool_shape, _pool_size, map_shards
from tests.helpers import read_run
from tests.stage_helpers import load_stage, outputs


# ---------------------------------------------------------------------------------------------
# fast: the setting and the local engine

def test_config_from_env_defaults_and_values():
    assert EngineConfig.from_env({}) == EngineConfig("local", "", 0, 0.0)
    c = EngineConfig.from_env({"PAS_ENGINE": " Ray ", "PAS_RAY_ADDRESS": "auto", "PAS_RAY_ACTORS": "3",
                               "PAS_RAY_NUM_GPUS_PER_ACTOR": "0.5"})
    assert c == EngineConfig("ray", "auto", 3, 0.5)
    with pytest.raises(ValueError, match="PAS_ENGINE='spark'"):
        EngineConfig.from_env({"PAS_ENGINE": "spark"})
    with pytest.raises(ValueError, match="PAS_RAY_ACTORS"):
        EngineConfig.from_env({"PAS_RAY_ACTORS": "two"})
    with pytest.raises(ValueError, match="≥ 0"):
        EngineConfig.from_env({"PAS_RAY_NUM_GPUS_PER_ACTOR": "-1"})
    assert EngineConfig.from_env({"PAS_RAY_CPUS_PER_ACTOR": "4"}).cpus_per_actor == 4.0
    with pytest.raises(ValueError, match="PAS_RAY_CPUS_PER_ACTOR"):
        EngineConfig.from_env({"PAS_RAY_CPUS_PER_ACTOR": "many"})


def test_pool_size():
    ray_cfg = EngineConfig("ray")
    assert _pool_size(ray_cfg, 10, {"CPU": 4.0}) == 4                        # one actor per CPU
    assert _pool_size(ray_cfg, 3, {"CPU": 8.0}) == 3                         # never more than the items
    assert _pool_size(EngineConfig("ray", num_gpus_per_actor=0.5), 10, {"CPU": 64.0, "GPU": 3.0}) == 6
    assert _pool_size(EngineConfig("ray", num_gpus_per_actor=1.0), 10, {"CPU": 8.0}) == 1   # ≥ 1
    assert _pool_size(EngineConfig("ray", actors=2), 10, {"CPU": 64.0}) == 2
    assert _pool_size(EngineConfig("ray", cpus_per_actor=4), 10, {"CPU": 16.0}) == 4


def test_pool_shape_shares_cpus_out():
    cpu = EngineConfig("ray")
    assert _pool_shape(cpu, 1, {"CPU": 2.0}, [2.0]) == (1, 2.0)             # one item: the whole node
    assert _pool_shape(cpu, 4, {"CPU": 2.0}, [2.0]) == (2, 1.0)
    assert _pool_shape(cpu, 3, {"CPU": 8.0}, [8.0]) == (3, 2.0)             # whole CPUs, rounded down
    assert _pool_shape(cpu, 1, {"CPU": 2.0}, [1.0, 1.0]) == (1, 1.0)        # never more than one node
    assert _pool_shape(cpu, 2, {"CPU": 64.0}, [32.0, 32.0]) == (2, 32.0)
    gpu = EngineConfig("ray", num_gpus_per_actor=1.0)
    assert _pool_shape(gpu, 8, {"CPU": 64.0, "GPU": 4.0}, [64.0]) == (4, 1.0)   # GPU actors: 1 CPU
    assert _pool_shape(EngineConfig("ray", num_gpus_per_actor=1.0, cpus_per_actor=8), 8,
                       {"CPU": 64.0, "GPU": 4.0}, [64.0]) == (4, 8.0)
    assert _pool_shape(EngineConfig("ray", cpus_per_actor=3), 10, {"CPU": 12.0}, [12.0]) == (4, 3.0)


def test_local_map_shards_loads_once_keeps_order_and_reports_each_result():
    loads, seen = [], []

    def factory():
        loads.append(1)
        return lambda x: x * 10

    out = map_shards(factory, [3, 1, 2], config=EngineConfig("local"),
                     on_result=lambda i, r: seen.append((i, r)))
    assert out == [30, 10, 20] and seen == [(0, 30), (1, 10), (2, 20)] and loads == [1]
    assert map_shards(factory, [], config=EngineConfig("local")) == [] and loads == [1]   # no load


# ---------------------------------------------------------------------------------------------
# slow: a real head + worker Ray cluster on 127.0.0.1

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with(marker: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _stop_cluster(temp_dir: str) -> None:
    """Kill, by pid, the processes of this cluster only: those whose command line names its temp dir
    (gcs_server, raylet, …) and their descendants (agents and workers, which rename themselves)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in _processes_with(temp_dir):
        try:
            p = psutil.Process(pid)
            procs.update({c.pid: c for c in p.children(recursive=True)})
            procs[pid] = p
        except psutil.NoSuchProcess:
            continue
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def start_cluster(n_nodes: int = 2, cpus_per_node: int = 1) -> tuple[str, str]:
    """`ray start --head` + `n_nodes − 1` × `ray start --address` on 127.0.0.1, in a private temp dir,
    without token auth (set RAY_AUTH_MODE=disabled in this process too before `ray.init`).
    Returns (address, temp_dir); stop with `_stop_cluster(temp_dir)`."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="pasray", dir="/tmp")       # short: Ray puts unix sockets in it
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = [f"--num-cpus={cpus_per_node}", "--node-ip-address=127.0.0.1",
              "--object-store-memory=100000000", "--disable-usage-stats"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--include-dashboard=false",
                        f"--temp-dir={temp_dir}", *common], check=True, env=env, capture_output=True)
        for _ in range(n_nodes - 1):
            subprocess.run([str(ray_bin), "start", f"--address={address}", *common], check=True, env=env,
                           capture_output=True)
    except BaseException:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return address, temp_dir


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # a private cluster on 127.0.0.1: no token auth (Ray ≥ 2.5x turns it on when ~/.ray/auth_token exists)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    address, temp_dir = start_cluster(n_nodes=2, cpus_per_node=1)
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=False)
        deadline = time.time() + 60
        while ray.cluster_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert ray.cluster_resources().get("CPU") == 2, ray.cluster_resources()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    pytest.importorskip("open_clip")
    from pas.models.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


def _run_stage(tmp_path: Path, out: str, monkeypatch, engine: str, address: str = "") -> dict:
    monkeypatch.setenv("PAS_ENGINE", engine)
    monkeypatch.setenv("PAS_RAY_ADDRESS", address)
    assert load_stage("ood").main(["--manifest", str(tmp_path / "manifest.parquet"),
                     "--images", str(tmp_path / "retrieved"), str(tmp_path / "generated"),
                     "--concepts", str(tmp_path / "bank.parquet"), "--clip", str(tmp_path / "clip"),
                     "--out", str(tmp_path / out), "--cache", str(tmp_path / f"{out}-cache"),
                     "--params", str(tmp_path / "params.yaml"), "--metrics", str(tmp_path / f"{out}.json")]) == 0
    # tracked results and the run log (timings, resume counters) together
    return {**json.loads((tmp_path / f"{out}.json").read_text()), **read_run(tmp_path / f"{out}.json")}


@pytest.mark.slow
def test_ood_ray_engine_is_byte_identical_to_local_and_resumes(tmp_path, monkeypatch, ray_cluster,
                                                               tiny_clip_dir):
    from tests.test_ood import _stage_inputs

    _stage_inputs(tmp_path, monkeypatch, tiny_clip_dir)
    m_local = _run_stage(tmp_path, "local", monkeypatch, "local")
    m_ray = _run_stage(tmp_path, "ray", monkeypatch, "ray", ray_cluster)
    local, ray_out = outputs(tmp_path / "local"), outputs(tmp_path / "ray")
    assert list(local) == ["scores.parquet"] and ray_out == local
    parts = {p.name: p.read_bytes() for p in (tmp_path / "local-cache").glob("*.parquet")}
    assert len(parts) == 3 and parts == {p.name: p.read_bytes() for p in (tmp_path / "ray-cache").glob("*.parquet")}
    for m in (m_local, m_ray):
        assert m["n_kept"] == 4 and m["n_shards_resumed"] == 0 and m["n_timed"] == 4
        assert m["seconds_per_image"]["clip"] > 0                  # ray: timings come back from the actors
    assert {k: v for k, v in m_ray.items() if k not in ("seconds_per_image", "seconds_text_embeddings")} == \
        {k: v for k, v in m_local.items() if k not in ("seconds_per_image", "seconds_text_embeddings")}
    # resumability across engines: a ray rerun over the local outputs scores nothing
    m_again = _run_stage(tmp_path, "local", monkeypatch, "ray", ray_cluster)
    assert m_again["n_shards_resumed"] == 3 and m_again["n_timed"] == 0
    assert outputs(tmp_path / "local") == local


@pytest.mark.slow
def test_ood_ray_survives_a_killed_actor(tmp_path, monkeypatch, ray_cluster, tiny_clip_dir):
    import cloudpickle

    import pas.curate.ood as ood_lib
    from tests.test_ood import _stage_inputs

    flag = tmp_path / "killed.json"

    class KillOnceScorer(ood_lib.OodScorer):
        """The first batch scored by any actor SIGKILLs that actor's process (once per test)."""

        def __call__(self, images):
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().__call__(images)
            os.write(fd, json.dumps({"pid": os.getpid()}).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])      # tests/ is not on the actors' path
    try:
        _stage_inputs(tmp_path, monkeypatch, tiny_clip_dir)
        _run_stage(tmp_path, "local", monkeypatch, "local")
        monkeypatch.setattr(ood_lib, "OodScorer", KillOnceScorer)
        m = _run_stage(tmp_path, "ray", monkeypatch, "ray", ray_cluster)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    killed = json.loads(flag.read_text())["pid"]
    assert killed != os.getpid()
    import psutil

    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert m["n_kept"] == 4 and m["n_timed"] == 4
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")


@pytest.mark.slow
def test_dedup_ray_engine_is_byte_identical_to_local(tmp_path, monkeypatch, ray_cluster):
    """SSCD descriptors on Ray actors: chunks of 3 samples that span shards and folders (CHUNK is 512 in
    the stage; the plan, hence every batch, is the same on both engines)."""
    import numpy as np
    import yaml
    from PIL import Image

    from pas.io.shards import iter_samples
    from pas.models.sscd import build_tiny_sscd, descriptors, load_sscd
    from tests.test_dedup import _write_images

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40 + 8 * (i % 3), 64, 3), dtype=np.uint8))
            for i in range(7)]                                    # three sizes: three shape buckets
    real = [(f"p{i}", im, "real") for i, im in enumerate(imgs[:5])] + [("p9", imgs[0].copy(), "real")]
    gen = [(f"g{i}", im, "synthetic") for i, im in enumerate(imgs[5:])]
    images = [str(_write_images(tmp_path, "retrieved", real)), str(_write_images(tmp_path, "generated", gen))]
    sscd_dir = build_tiny_sscd(tmp_path / "sscd", seed=0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"lambda_dup": 0.99999, "k_dup": 4, "seed": 0,
                                      "dedup": {"device": "cpu", "batch_size": 2}}))
    outs = {}
    for engine in ("local", "ray"):
        monkeypatch.setenv("PAS_ENGINE", engine)
        monkeypatch.setenv("PAS_RAY_ADDRESS", ray_cluster)
        stage = load_stage("dedup")
        stage.CHUNK = 3
        assert stage.main(["--images", *images, "--sscd", str(sscd_dir), "--out", str(tmp_path / engine),
                           "--params", str(params), "--metrics", str(tmp_path / f"{engine}.json"),
                           "--cache", ""]) == 0
        outs[engine] = outputs(tmp_path / engine)
    assert sorted(outs["local"]) == ["descriptors.json", "descriptors.npy", "groups.html", "keys.parquet",
                                     "manifest.parquet"]
    assert outs["ray"] == outs["local"]
    # the chunk plan: rows are the descriptors of the stored order cut every 3 samples
    x = np.load(tmp_path / "local" / "descriptors.npy")
    resize = json.loads((tmp_path / "local" / "descriptors.json").read_text())["resize"]
    model = load_sscd(sscd_dir)
    pils = [s.pil() for s in iter_samples(images)]               # stored order: retrieved, then generated
    assert len(pils) == len(x) == 8
    ref = np.concatenate([descriptors(model, pils[i:i + 3], resize=resize, batch_size=2)
                          for i in range(0, 8, 3)])
    np.testing.assert_array_equal(x, ref)


@pytest.mark.slow
def test_leakage_ray_engine_is_byte_identical_to_local(tmp_path, monkeypatch, ray_cluster, clipart_food):
    """Test-image SSCD descriptors on Ray actors: chunks of 2 that span shards (the wds eval set) and
    list files (the ImageFolder), the same plan on both engines."""
    from tests.test_leakage import stage_inputs

    ctx = stage_inputs(tmp_path, clipart_food)
    outs, metrics = {}, {}
    for engine in ("local", "ray"):
        monkeypatch.setenv("PAS_ENGINE", engine)
        monkeypatch.setenv("PAS_RAY_ADDRESS", ray_cluster)
        stage = load_stage("leakage")
        stage.CHUNK = 2
        assert stage.main([*ctx["args"], "--out", str(tmp_path / engine),
                           "--metrics", str(tmp_path / f"{engine}.json")]) == 0
        outs[engine] = outputs(tmp_path / engine)
        metrics[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
    assert sorted(outs["local"]) == ["checked.parquet", "manifest.parquet", "test_descriptors.npy",
                                     "test_keys.parquet"]
    assert outs["ray"] == outs["local"] and metrics["ray"] == metrics["local"]
    # p900, p901 and p000 (its removed duplicate p902 copies t0): tests/test_leakage.py
    assert metrics["local"]["n_test"] == {"food": 5, "mine": 3} and metrics["local"]["n_kept"] == metrics["local"]["n_in"] - 3


@pytest.mark.slow
def test_pool_ray_engine_is_byte_identical_to_local(tmp_path, monkeypatch, ray_cluster, clipart_food,
                                                    tiny_clip_dir):
    """Pool embeddings on Ray actors, one chunk of written images per task (3 chunks of 5 input files,
    cut across 3 shards of 4, batches of 3 restarting at every chunk), against the in-stream local
    embedding; a chunk embedded on Ray is resumed by a local run."""
    import numpy as np

    import pas.data.pool as pool_mod
    from pas.data.pool import PoolParams, build_pool
    from pas.engine import EngineConfig

    monkeypatch.setattr(pool_mod, "CHUNK", 5)

    src = tmp_path / "src" / "food"
    src.mkdir(parents=True)
    for f in clipart_food[:11]:
        (src / f.name).write_bytes(f.read_bytes())
    p = PoolParams(source=str(tmp_path / "src"), max_side=96, shard_size=4, batch_size=3, workers=1)
    m_local = build_pool(p, None, tmp_path / "local", clip_dir=tiny_clip_dir, engine=EngineConfig("local"))
    m_ray = build_pool(p, None, tmp_path / "ray", clip_dir=tiny_clip_dir,
                       engine=EngineConfig("ray", ray_address=ray_cluster), cache_dir=tmp_path / "cache")
    assert m_local["n_shards"] == 3 and 9 <= m_local["n_indexed"] <= 11
    results = [k for k in m_local if not k.startswith("seconds") and k != "images_per_second"]
    assert {k: m_ray[k] for k in results} == {k: m_local[k] for k in results}
    local, ray_out = outputs(tmp_path / "local"), outputs(tmp_path / "ray")
    assert "embeddings.npy" in local and ray_out == local
    m_resumed = build_pool(p, None, tmp_path / "resumed", clip_dir=tiny_clip_dir, engine=EngineConfig("local"),
                           cache_dir=tmp_path / "cache")
    assert m_resumed["n_chunks_resumed"] == 3 and outputs(tmp_path / "resumed") == local
    emb = np.load(tmp_path / "local" / "embeddings.npy")
    assert emb.shape == (m_local["n_indexed"], 128)


@pytest.mark.slow
def test_generate_ray_engine_is_byte_identical_and_resumes_across_engines(tmp_path, ray_cluster):
    """Diffusion shards on Ray actors (tiny SD, 1 torch thread on both engines): the same bytes as a
    local run; a shard drawn locally before is not redrawn by the Ray run (shard-based resume)."""
    import shutil

    from pas.collect.generate import DiffusionParams, GenerateParams, generate
    from pas.engine import EngineConfig
    from pas.models.diffusion import build_tiny_sd
    from tests.helpers import file_digests
    from tests.test_generate import CAPS

    sd_dir = build_tiny_sd(tmp_path / "diffusion", seed=0)
    p = GenerateParams(n_synth=2, seed=0, shard_size=3)
    d = DiffusionParams(steps=2, guidance=3.0, resolution=64, batch_size=2, threads=1)
    ray_cfg = EngineConfig("ray", ray_address=ray_cluster)
    m_local = generate(CAPS, sd_dir, tmp_path / "out_local", tmp_path / "cache_local", p, d, progress=False,
                       engine=EngineConfig("local"))
    m_ray = generate(CAPS, sd_dir, tmp_path / "out_ray", tmp_path / "cache_ray", p, d, progress=False,
                     engine=ray_cfg)
    assert m_local["n_shards"] == m_ray["n_shards"] == m_ray["n_shards_generated"] == 3
    assert file_digests(tmp_path / "out_ray") == file_digests(tmp_path / "out_local")
    # resume across engines: keep the locally drawn shard 0 (and its marker) only; Ray draws the rest
    cache = tmp_path / "cache_mixed" / "shards"
    cache.mkdir(parents=True)
    first = (tmp_path / "out_local" / "generated-000000.tar").read_bytes()
    tar = next(t for t in (tmp_path / "cache_local" / "shards").glob("*.tar") if t.read_bytes() == first)
    for f in (tar, tar.with_suffix(".json")):
        shutil.copy(f, cache / f.name)
    m_mixed = generate(CAPS, sd_dir, tmp_path / "out_mixed", tmp_path / "cache_mixed", p, d, progress=False,
                       engine=ray_cfg)
    assert (m_mixed["n_shards_resumed"], m_mixed["n_shards_generated"]) == (1, 2)
    assert file_digests(tmp_path / "out_mixed") == file_digests(tmp_path / "out_local")


# ---------------------------------------------------------------------------------------------
# backend vllm under PAS_ENGINE=ray: ray.data.llm

def test_ray_vllm_backend_is_chosen_and_configured():
    vLLMEngineProcessorConfig = pytest.importorskip("ray.data.llm").vLLMEngineProcessorConfig

    from pas.llm import make_backend
    from pas.llm.base import LLMSpec
    from pas.llm.ray_vllm_backend import RayVLLMBackend, processor_config_kwargs, replicas
    from pas.llm.vllm_backend import VLLMBackend

    spec = {"backend": "vllm", "model": "models/llm", "dtype": "bfloat16", "batch_size": 16,
            "tensor_parallel_size": 2, "max_model_len": 4096}
    assert isinstance(make_backend(spec, engine=EngineConfig("ray")), RayVLLMBackend)
    assert isinstance(make_backend(spec, engine=EngineConfig("local")), VLLMBackend)
    s = LLMSpec(**spec)
    assert replicas(s, 0, {"GPU": 8.0}) == 4 and replicas(s, 0, {"CPU": 4.0}) == 1 and replicas(s, 3, {}) == 3
    kw = processor_config_kwargs(s, 4)
    assert kw["model_source"] == "models/llm" and kw["batch_size"] == 16 and kw["concurrency"] == 4
    assert kw["engine_kwargs"] == {"dtype": "bfloat16", "seed": 0, "gpu_memory_utilization": 0.9,
                                   "tensor_parallel_size": 2, "max_model_len": 4096}
    cfg = vLLMEngineProcessorConfig(**kw)                  # Ray's own validation accepts them
    assert cfg.concurrency == 4 and cfg.should_continue_on_error
    assert cfg.chat_template_stage is False and cfg.tokenize_stage is False   # token ids come from us


def test_ray_vllm_postprocess_reads_logprobs_and_errors():
    from pas.llm.ray_vllm_backend import _postprocess

    steps = [{5: {"logprob": -0.1, "decoded_token": "Yes"}, 9: {"logprob": -2.5, "decoded_token": "No"}},
             {7: {"logprob": -0.3, "decoded_token": "!"}}]
    row = {"i": 3, "generated_text": " Yes! ", "generated_tokens": [5, 7], "num_generated_tokens": 2,
           "logprobs": steps}
    chat = _postprocess(row, yes_no=False)
    assert chat == {"i": 3, "text": "Yes!", "n_tokens": 2, "logprobs": [["Yes", -0.1], ["!", -0.3]],
                    "has_logprobs": True, "error": ""}
    yn = _postprocess(row, yes_no=True)
    assert yn["logprobs"] == [["Yes", -0.1], ["No", -2.5]]
    err = _postprocess({"i": 0, "__inference_error__": "CUDA OOM", "generated_text": ""}, yes_no=False)
    assert err["error"] == "CUDA OOM" and err["text"] == "" and not err["has_logprobs"]


def _fake_vllm_processor(config, preprocess, postprocess):
    """Stands in for `ray.data.llm.build_processor` (Ray 2.60) where vLLM cannot run (no GPU), with the
    stages Ray builds from `config`: preprocess (its output merged into the row, as wrap_preprocess
    does) → chat template (when `chat_template_stage`: the model folder's template, as text) →
    tokenize (when `tokenize_stage`: `tokenizer(prompts)`, i.e. *with* special tokens, as Ray's
    TokenizeUDF does) → engine (a `tokenized_prompt` as is, else the `prompt` string tokenised with
    special tokens, as vLLM does) → postprocess. The 'engine' records the token ids it was fed, echoes
    the decoded prompt's last user line and its sampling seed, and puts all the log-probability mass
    of the first token on "Yes" for prompts that contain 'apple'. As in Ray with
    `should_continue_on_error`, a row the engine fails on ('poison' in the prompt) carries
    `__inference_error__` and skips the user's postprocess; the others get `__inference_error__` = ""."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config.model_source)
    assert config.should_continue_on_error

    def pre(row):
        return {**row, **preprocess(row)}

    def template(row):
        text = tok.apply_chat_template(list(row["messages"]), add_generation_prompt=True, tokenize=False)
        return {**row, "prompt": text}

    def tokenize(row):
        return {**row, "tokenized_prompt": tok(row["prompt"])["input_ids"]}

    def engine(row):
        ids = list(row["tokenized_prompt"]) if "tokenized_prompt" in row else tok(row["prompt"])["input_ids"]
        _fake_vllm_processor.fed.append(ids)
        sp = row["sampling_params"]
        _fake_vllm_processor.sampling.append(sp)
        msg = tok.decode(ids, skip_special_tokens=True).rsplit("<|user|>", 1)[-1].split("\n")[0]
        if "poison" in msg:
            return {**row, "generated_text": "", "num_generated_tokens": 0,
                    "__inference_error__": "ValueError: prompt too long"}
        yes = "apple" in msg
        first = {11: {"logprob": -0.05 if yes else -3.0, "decoded_token": " Yes"},
                 12: {"logprob": -3.0 if yes else -0.05, "decoded_token": " No"}}
        text = f"{msg} | seed {sp['seed']} | max {sp['max_tokens']}"
        return {**row, "generated_text": text, "generated_tokens": [11 if yes else 12],
                "num_generated_tokens": 1, "logprobs": [first], "__inference_error__": ""}

    def post(row):  # Ray's wrap_postprocess: error rows bypass the user's function
        if row.get("__inference_error__", "") != "":
            return row
        return {**postprocess(row), "__inference_error__": ""}

    stages = [pre] + ([template] if config.chat_template_stage else []) + \
        ([tokenize] if config.tokenize_stage else []) + [engine, post]

    def run(ds):
        for fn in stages:
            ds = ds.map(fn)
        return ds
    return run


_fake_vllm_processor.fed = []
_fake_vllm_processor.sampling = []   # the sampling_params dict of each row the engine got


class _ListDataset:
    """The Ray Dataset calls the backend's processor chain uses, in-process. Rows come back as from one
    Ray block: every column of any row, None where a row has none (TableBlockBuilder.add)."""

    def __init__(self, rows):
        self.rows = list(rows)

    def map(self, fn):
        return _ListDataset(fn(dict(r)) for r in self.rows)

    def take_all(self):
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        return [{k: r.get(k) for k in cols} for r in reversed(self.rows)]  # Ray does not promise order

    def iter_rows(self):
        return iter(self.take_all())


@pytest.fixture
def fake_ray_llm(monkeypatch, tmp_path):
    """ray.data.llm's processor and ray.data.from_items replaced by the stand-ins above; the model
    folder is a tokenizer with a BOS (tests/llm_helpers.py)."""
    ray = pytest.importorskip("ray")
    ray_llm = pytest.importorskip("ray.data.llm")
    import pas.engine
    from tests.llm_helpers import bos_tokenizer

    monkeypatch.setattr(ray_llm, "build_processor", _fake_vllm_processor)
    monkeypatch.setattr(ray.data, "from_items", _ListDataset)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0})
    monkeypatch.setattr(pas.engine, "ensure_ray", lambda address="": None)
    _fake_vllm_processor.fed.clear()
    _fake_vllm_processor.sampling.clear()
    return bos_tokenizer(tmp_path / "llm", max_position_embeddings=512)


def test_ray_vllm_backend_error_rows_skip_postprocess(fake_ray_llm):
    """Before: KeyError 'error' on the row Ray handed back without postprocess; then, in a block with
    successful rows, the error row's `error`/`has_logprobs` are None and it passed for an answer."""
    from pas.llm import ChatRequest, make_backend

    llm = make_backend({"backend": "vllm", "model": str(fake_ray_llm), "max_new_tokens": 40},
                       engine=EngineConfig("ray", actors=1))
    reqs = [ChatRequest(messages=({"role": "user", "content": q},), seed=5)
            for q in ("name food", "poison", "is apple pie food?")]
    out = llm.chat(reqs)
    assert out[0].text == "name food | seed 5 | max 40" and out[0].error is None
    assert out[1].text == "" and out[1].error == "ValueError: prompt too long"
    v = llm.yes_no(reqs)
    assert [x.method for x in v] == ["logprobs", "error", "logprobs"] and v[2].p_yes > 0.9 > 0.1 > v[0].p_yes
    assert not v[1].usable
    pieces = list(llm.chat_stream(reqs))                  # the same answers, streamed
    got = {i: r for idx, res in pieces for i, r in zip(idx, res)}
    assert sorted(got) == [0, 1, 2] and [got[i].text for i in range(3)] == [r.text for r in out]


def test_ray_vllm_prompt_has_one_bos(fake_ray_llm):
    """The chat template starts with BOS; Ray's own tokenize stage would encode it with special tokens
    and feed the engine two. The backend's token ids (and count_tokens) have exactly one."""
    from transformers import AutoTokenizer

    from pas.llm import ChatRequest, make_backend

    llm = make_backend({"backend": "vllm", "model": str(fake_ray_llm)}, engine=EngineConfig("ray", actors=1))
    msgs = ({"role": "system", "content": "sys"}, {"role": "user", "content": "name a dish"})
    llm.chat([ChatRequest(messages=msgs, seed=1)])
    llm.yes_no([ChatRequest(messages=msgs, seed=1)])
    assert len(_fake_vllm_processor.fed) == 2
    for ids in _fake_vllm_processor.fed:
        assert ids[0] == 0 and ids.count(0) == 1
    assert llm.count_tokens(msgs) == len(_fake_vllm_processor.fed[0])
    assert llm.context_length() == 512                      # the folder's config.json
    # what Ray's default stages would have fed: two BOS (the bug)
    tok = AutoTokenizer.from_pretrained(fake_ray_llm)
    doubled = tok(tok.apply_chat_template(list(msgs), add_generation_prompt=True, tokenize=False))["input_ids"]
    assert doubled[:2] == [0, 0]


def test_ray_vllm_list_requests_carry_structured_outputs(fake_ray_llm):
    """A list request's schema reaches Ray's engine stage as sampling_params["structured_outputs"] =
    {"json": schema as a JSON string}, which Ray 2.60 makes vLLM's StructuredOutputsParams; plain and
    yes/no requests carry none."""
    import json

    from pas.llm import ChatRequest, make_backend

    llm = make_backend({"backend": "vllm", "model": str(fake_ray_llm)}, engine=EngineConfig("ray", actors=1))
    msgs = ({"role": "user", "content": "name dishes"},)
    schema = llm.list_schema(4)
    assert schema is not None
    llm.chat([ChatRequest(messages=msgs, seed=1, schema=schema), ChatRequest(messages=msgs, seed=2)])
    llm.yes_no([ChatRequest(messages=msgs, seed=3, schema=schema)])
    by_seed = {sp["seed"]: sp for sp in _fake_vllm_processor.sampling}
    assert json.loads(by_seed[1]["structured_outputs"]["json"]) == schema
    assert "structured_outputs" not in by_seed[2] and "structured_outputs" not in by_seed[3]


@pytest.mark.slow
def test_ray_vllm_backend_through_ray_data(ray_cluster, monkeypatch, tmp_path):
    pytest.importorskip("ray.data.llm")
    import ray.data.llm

    from pas.llm import ChatRequest, make_backend
    from tests.llm_helpers import bos_tokenizer

    monkeypatch.setattr(ray.data.llm, "build_processor", _fake_vllm_processor)
    model = bos_tokenizer(tmp_path / "llm")
    llm = make_backend({"backend": "vllm", "model": str(model), "max_new_tokens": 40},
                       engine=EngineConfig("ray", ray_address=ray_cluster, actors=1))
    reqs = [ChatRequest(messages=({"role": "user", "content": f"name food {i}"},), seed=100 + i,
                        max_new_tokens=8 if i == 3 else None) for i in range(12)]
    reqs[5] = ChatRequest(messages=({"role": "user", "content": "poison"},), seed=105)
    out = llm.chat(reqs)
    assert [r.text for r in out] == [f"name food {i} | seed {100 + i} | max {8 if i == 3 else 40}"
                                     if i != 5 else "" for i in range(12)]   # request order, own seeds
    assert out[0].logprobs == [(" No", -0.05)] and out[0].n_tokens == 1 and out[0].error is None
    assert out[5].error == "ValueError: prompt too long"    # an error row among answers, in real blocks
    verdicts = llm.yes_no([ChatRequest(messages=({"role": "user", "content": q},))
                           for q in ("is apple pie food?", "is a car food?")])
    assert [v.method for v in verdicts] == ["logprobs", "logprobs"]
    assert verdicts[0].p_yes > 0.9 > 0.1 > verdicts[1].p_yes


@pytest.mark.slow
def test_generate_ray_survives_an_actor_killed_mid_shard(tmp_path, monkeypatch, ray_cluster):
    """An actor SIGKILLed halfway through writing a shard (a partial temp tar on disk): Ray restarts it,
    the shard is redrawn from scratch, and the output equals an uninterrupted local run."""
    import cloudpickle

    import pas.collect.generate as gen_lib
    from pas.collect.generate import DiffusionParams, GenerateParams, generate
    from pas.engine import EngineConfig
    from pas.models.diffusion import build_tiny_sd
    from tests.helpers import file_digests
    from tests.test_generate import CAPS

    flag = tmp_path / "killed.json"

    class KillOnceRender(gen_lib._RenderShards):
        def run(self, work):
            tar, _ = work
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().run(work)
            os.write(fd, json.dumps({"pid": os.getpid(), "shard": tar}).encode())
            os.close(fd)
            partial = Path(tar).parent / f".tmp-{Path(tar).stem}"
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "part-000000.tar").write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)

    sd_dir = build_tiny_sd(tmp_path / "diffusion", seed=0)
    p = GenerateParams(n_synth=2, seed=0, shard_size=3)
    d = DiffusionParams(steps=2, guidance=3.0, resolution=64, batch_size=2, threads=1)
    generate(CAPS, sd_dir, tmp_path / "out_local", tmp_path / "cache_local", p, d, progress=False,
             engine=EngineConfig("local"))
    monkeypatch.setattr(gen_lib, "_RenderShards", KillOnceRender)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        m = generate(CAPS, sd_dir, tmp_path / "out_ray", tmp_path / "cache_ray", p, d, progress=False,
                     engine=EngineConfig("ray", ray_address=ray_cluster))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert json.loads(flag.read_text())["pid"] != os.getpid()
    assert m["n_shards_generated"] == 3
    assert file_digests(tmp_path / "out_ray") == file_digests(tmp_path / "out_local")
    assert not list((tmp_path / "cache_ray" / "shards").glob(".tmp-*"))
