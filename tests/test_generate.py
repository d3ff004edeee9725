"""generate: images from the captions stage's out — determinism, regenerate-alone, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pas.collect.caption_files import Captions, read_captions, write_caption_files
from pas.collect.generate import DiffusionParams, GenerateParams, generate, generate_images, plan
from pas.io.manifest import read_parquet
from pas.io.shards import decode_image, encode_image, iter_samples
from pas.params import ParamsError
from pas.seeds import derive_seed
from tests.helpers import file_digests, read_run
from tests.stage_helpers import load_stage

ROOT = Path(__file__).resolve().parents[1]
D = DiffusionParams(steps=2, guidance=3.0, resolution=64, batch_size=3)


def test_params_validation():
    with pytest.raises(ParamsError, match="resolution"):
        DiffusionParams(resolution=60)
    with pytest.raises(ParamsError, match="scheduler"):
        DiffusionParams(scheduler="magic")
    with pytest.raises(ParamsError, match="shard_size"):
        GenerateParams(shard_size=20_000)
    with pytest.raises(ParamsError, match="threads"):
        DiffusionParams(threads=-1)


def test_plan_keys_and_seeds():
    caps = Captions({"b": [("cap b0", False)], "a": [("cap a0", False), ("cap a1", True)]})
    items = plan(caps, n_synth=2, seed=3)
    assert [(it.concept, it.caption_idx, it.image_idx) for it in items] == [
        ("a", 0, 0), ("a", 0, 1), ("a", 1, 0), ("a", 1, 1), ("b", 0, 0), ("b", 0, 1)]
    assert len({it.key for it in items}) == 6 and all(it.key.startswith("g") for it in items)
    assert items[1].seed == derive_seed(3, "image", "a", 0, 1)
    assert [it.seed for it in plan(caps, 2, 3)] == [it.seed for it in items]
    assert [it.seed for it in plan(caps, 2, 4)] != [it.seed for it in items]


# -------------------------------------------------------------------------------------------- images
@pytest.fixture(autouse=True)
def one_torch_thread():
    """Measured here: on a loaded 2-core machine torch's 2 threads spin-wait (pipeline 16 images: 7 s with
    2 threads vs 0.6 s with 1). Output bytes are compared between runs of the same thread count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from pas.models.diffusion import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "diffusion", seed=0)


CAPS = Captions({"apple pie": [("A slice of apple pie on a plate.", False), ("a photo of apple pie.", True)],
                 "ramen": [("A bowl of ramen on a counter.", False), ("Ramen at night.", False)]})


def test_generate_deterministic_and_resumes(sd_dir, tmp_path):
    p = GenerateParams(n_synth=3, seed=0, shard_size=5)
    m1 = generate(CAPS, sd_dir, tmp_path / "out1", tmp_path / "cache1", p, D, progress=False)
    assert m1["n_images"] == 12 and m1["n_shards"] == 3 and m1["n_shards_generated"] == 3
    assert m1["n_captions"] == 4 and m1["n_fallback_captions"] == 1 and m1["seconds_per_image"] > 0
    generate(CAPS, sd_dir, tmp_path / "out2", tmp_path / "cache2", p, D, progress=False)
    assert file_digests(tmp_path / "out1") == file_digests(tmp_path / "out2")       # same seed → same bytes
    # rerun on the finished cache: nothing drawn, same bytes
    m3 = generate(CAPS, sd_dir, tmp_path / "out1", tmp_path / "cache1", p, D, progress=False)
    assert m3["n_shards_resumed"] == 3 and m3["n_shards_generated"] == 0
    assert file_digests(tmp_path / "out1") == file_digests(tmp_path / "out2")
    # index ↔ shards
    idx = read_parquet(tmp_path / "out1" / "index.parquet")
    samples = list(iter_samples(tmp_path / "out1"))
    assert sorted(s.key for s in samples) == list(idx.key)
    by_key = idx.set_index("key")
    for s in samples:
        row = by_key.loc[s.key]
        assert s.shard == row.shard and s.meta["source"] == "synthetic" == row.source
        assert (s.meta["concept"], s.meta["caption"], s.meta["seed"]) == (row.concept, row.caption, row.seed)
        assert s.pil().size == (64, 64)
    assert len(read_parquet(tmp_path / "out1" / "captions.parquet")) == 4
    # a different diffusion param invalidates every shard
    m4 = generate(CAPS, sd_dir, tmp_path / "out1", tmp_path / "cache1", p,
                  DiffusionParams(steps=3, guidance=3.0, resolution=64, batch_size=3), progress=False)
    assert m4["n_shards_resumed"] == 0 and m4["n_shards_generated"] == 3
    # fewer images: stale shards of the longer plan are removed from the cache
    generate(CAPS, sd_dir, tmp_path / "out1", tmp_path / "cache1", GenerateParams(n_synth=1,
             shard_size=5), D, progress=False)
    (tar,) = (tmp_path / "cache1" / "shards").glob("*.tar")
    assert tar.read_bytes() == (tmp_path / "out1" / "generated-000000.tar").read_bytes()
    assert sorted(p.name for p in tar.parent.iterdir()) == sorted([tar.name, tar.with_suffix(".json").name])


def test_regenerate_one_image_alone(sd_dir, tmp_path):
    from pas.models.diffusion import load_pipeline

    p = GenerateParams(n_synth=3, seed=0, shard_size=100)
    generate(CAPS, sd_dir, tmp_path / "out", tmp_path / "cache", p, D, progress=False)
    s = [s for s in iter_samples(tmp_path / "out")][7]
    pipe = load_pipeline(sd_dir, D.device, D.dtype, D.scheduler)
    def jpeg(im):
        return np.asarray(decode_image(encode_image(im, "jpg", D.jpeg_quality)), np.float32)

    b = np.asarray(s.pil(), np.float32)
    a = jpeg(generate_images(pipe, [s.meta["caption"]], [s.meta["seed"]], D)[0])
    assert np.abs(a - b).mean() < 0.5        # same image up to float rounding of another batch shape
    other = jpeg(generate_images(pipe, [s.meta["caption"]], [s.meta["seed"] + 1], D)[0])
    assert np.abs(other - b).mean() > 5.0


KILL_SCRIPT = """
import sys
sys.path.insert(0, {src!r})
from pas.collect.caption_files import Captions
from pas.collect.generate import DiffusionParams, GenerateParams, generate
caps = Captions({caps!r})
generate(caps, {model!r}, {out!r}, {cache!r}, GenerateParams(n_synth={n_synth}, shard_size=4),
         DiffusionParams(steps=2, guidance=3.0, resolution=64, batch_size=3), progress=False)
"""


def _markers(cache: Path) -> list[Path]:
    """The done markers of the store (not a marker being written: `.tmp-*`)."""
    return [m for m in (cache / "shards").glob("*.json") if not m.name.startswith(".")]


def test_sigkill_and_resume(sd_dir, tmp_path):
    n_synth = 6                                      # 4 captions × 6 = 24 images = 6 shards of 4
    p = GenerateParams(n_synth=n_synth, shard_size=4)
    ref = generate(CAPS, sd_dir, tmp_path / "ref", tmp_path / "ref_cache", p, D, progress=False)
    assert ref["n_shards"] == 6
    cache, out = tmp_path / "cache", tmp_path / "out"
    script = KILL_SCRIPT.format(src=str(ROOT / "src"), caps=CAPS.captions, model=str(sd_dir), out=str(out),
                                cache=str(cache), n_synth=n_synth)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}        # same thread count as this process (fixture)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(_markers(cache)) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"worker ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(_markers(cache))
    assert 2 <= done < 6
    assert not out.exists() or not list(out.glob("*.tar"))           # the out is written only at the end
    m = generate(CAPS, sd_dir, out, cache, p, D, progress=False)
    assert m["n_shards_resumed"] == done and m["n_shards_generated"] == 6 - done
    assert file_digests(out) == file_digests(tmp_path / "ref")
    assert not [q for q in (cache / "shards").iterdir() if q.name.startswith(".tmp")]


def test_tampered_shard_is_redone(sd_dir, tmp_path):
    p = GenerateParams(n_synth=2, shard_size=4)
    generate(CAPS, sd_dir, tmp_path / "out", tmp_path / "cache", p, D, progress=False)
    ref = file_digests(tmp_path / "out")
    tar = sorted((tmp_path / "cache" / "shards").glob("*.tar"))[1]
    data = tar.read_bytes()
    tar.unlink()                                       # never write in place: it may be hard-linked
    tar.write_bytes(data[:-1024])
    m = generate(CAPS, sd_dir, tmp_path / "out", tmp_path / "cache", p, D, progress=False)
    assert m["n_shards_generated"] == 1 and m["n_shards_resumed"] == 1
    assert file_digests(tmp_path / "out") == ref


def test_hostile_concepts_stay_inside(sd_dir, tmp_path):
    hostile = ["../../etc/passwd", "/abs", 'q"uo\'te', "🍕🍣", "x" * 1000, "a\\b", "nul\x00", ".."]
    caps = Captions({c: [(f"a photo of {c}.", True)] for c in hostile})
    root = tmp_path / "data"
    m = generate(caps, sd_dir, root / "generated", root / ".cache" / "generate",
                 GenerateParams(n_synth=1, shard_size=3), D, progress=False)
    assert m["n_images"] == len(hostile)
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert all(f.startswith(("data/generated/", "data/.cache/generate/")) for f in files)
    assert {s.meta["concept"] for s in iter_samples(root / "generated")} == set(hostile)


# ----------------------------------------------------------------------------------------- the stage
def test_stage_main_reads_the_captions_out(sd_dir, tmp_path):
    """The stage end to end on the captions stage's out (no LLM here: that is the captions stage)."""
    (tmp_path / "captions").mkdir()
    write_caption_files(CAPS, tmp_path / "captions" / "captions.parquet",
                        tmp_path / "captions" / "transcripts.jsonl")
    (tmp_path / "params.yaml").write_text(json.dumps({
        "n_synth": 2, "seed": 0, "generate": {"shard_size": 3},
        "diffusion": {"steps": 2, "batch_size": 4, "guidance": 3.0, "threads": 1}}))
    stage = load_stage("generate")
    argv = ["--captions", str(tmp_path / "captions"), "--model", str(sd_dir), "--out", str(tmp_path / "gen"),
            "--cache", str(tmp_path / "cache"), "--metrics", str(tmp_path / "m.json"),
            "--params", str(tmp_path / "params.yaml")]
    assert stage.main(argv) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_images"] == 8 and m["n_shards"] == 3 and m["n_captions"] == 4 and m["n_fallback_captions"] == 1
    assert len(read_parquet(tmp_path / "gen" / "index.parquet")) == 8
    for a, b in (("captions.parquet", "captions.parquet"), ("transcripts.jsonl", "captions_raw.jsonl")):
        assert (tmp_path / "captions" / a).read_bytes() == (tmp_path / "gen" / b).read_bytes()  # a copy
    assert read_captions(tmp_path / "captions") == CAPS
    tracked = (tmp_path / "m.json").read_bytes()
    # a finished run with --prune-cache: out assembled from the scratch shards, which are then dropped
    assert stage.main(argv + ["--prune-cache"]) == 0
    run = read_run(tmp_path / "m.json")
    assert run["n_shards_resumed"] == 3 and run["n_shards_generated"] == 0 and run["images_generated"] == 0
    assert (tmp_path / "m.json").read_bytes() == tracked    # resuming changes no tracked metric
    assert not (tmp_path / "cache" / "shards").exists()
    assert len(list(iter_samples(tmp_path / "gen"))) == 8
    # missing model folder or captions: clear message, exit 2
    assert stage.main(argv[:2] + ["--model", str(tmp_path / "nowhere")] + argv[4:]) == 2
    assert stage.main(["--captions", str(tmp_path / "nowhere")] + argv[2:]) == 2
    (tmp_path / "captions" / "transcripts.jsonl").write_text("{not json\n")
    assert stage.main(argv) == 2


def test_read_captions_refuses_malformed_files(tmp_path):
    import pandas as pd

    from pas.io.manifest import write_parquet

    write_caption_files(CAPS, tmp_path / "captions.parquet", tmp_path / "transcripts.jsonl")
    df = read_parquet(tmp_path / "captions.parquet")
    write_parquet(df.drop(columns=["fallback"]), tmp_path / "captions.parquet", sort_by=None)
    with pytest.raises(ValueError, match="missing column"):
        read_captions(tmp_path)
    write_parquet(pd.concat([df.iloc[1:], df.iloc[:1]]), tmp_path / "captions.parquet", sort_by=None)
    with pytest.raises(ValueError, match="out of order"):
        read_captions(tmp_path)


@pytest.mark.slow
def test_captions_then_generate_with_real_smollm2(sd_dir, tmp_path):
    """Real L4 (SmolLM2-135M-Instruct, offline) writing captions, then images from them; measures both."""
    import pandas as pd

    from pas.io.manifest import write_parquet
    from pas.models.llm import OFFLINE_LLM, prepare_llm

    llm_dir = Path(os.environ.get("PAS_TEST_LLM_DIR", tmp_path / "llm"))
    if not (llm_dir / "config.json").is_file():
        prepare_llm(OFFLINE_LLM, llm_dir)
    concepts = ["apple pie", "ramen", "sushi", "paella", "croissant", "guacamole"]
    write_parquet(pd.DataFrame({"concept": concepts, "accepted": [True] * 6}), tmp_path / "bank.parquet")
    (tmp_path / "params.yaml").write_text(json.dumps({
        "n_cap": 2, "n_synth": 2, "seed": 0, "generate": {"shard_size": 8},
        "diffusion": {"steps": 2, "batch_size": 8, "guidance": 3.0, "threads": 1},
        "llm": {"l4": {"backend": "transformers", "model": str(llm_dir), "max_new_tokens": 160,
                       "batch_size": 8}}}))
    common = ["--params", str(tmp_path / "params.yaml")]
    t0 = time.time()
    assert load_stage("captions").main(["--concepts", str(tmp_path / "bank.parquet"), "--out", str(tmp_path / "cap"),
                                        "--cache", str(tmp_path / "ccache"), "--metrics", str(tmp_path / "c.json"),
                                        "--no-progress"] + common) == 0
    t1 = time.time()
    assert load_stage("generate").main(["--captions", str(tmp_path / "cap"), "--model", str(sd_dir),
                                        "--out", str(tmp_path / "gen"), "--cache", str(tmp_path / "cache"),
                                        "--metrics", str(tmp_path / "m.json")] + common) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    print("real-LLM captions:", (tmp_path / "c.json").read_text(), f"{t1 - t0:.1f}s; generate {time.time() - t1:.1f}s")
    assert m["n_captions"] == 12 and m["n_images"] == 24
    caps = read_parquet(tmp_path / "gen" / "captions.parquet")
    assert all(c.lower() in cap.lower() for c, cap in zip(caps.concept, caps.caption))
