"""generate: caption parsing/retries/fallbacks, determinism, regenerate-alone, kill -9 and resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pas.collect.captions import (Captions, clean_captions, derive_seed, fallback_captions, load_template,
                                  render, write_captions)
from pas.collect.generate import (DiffusionParams, GenerateParams, caption_fingerprint, generate,
                                  generate_images, plan)
from pas.io.manifest import read_parquet, read_run, write_parquet
from pas.io.shards import decode_image, encode_image, iter_samples
from pas.llm import ChatResult
from pas.params import ParamsError
from tests.stage_helpers import load_stage

ROOT = Path(__file__).resolve().parents[1]
D = DiffusionParams(steps=2, guidance=3.0, resolution=64, batch_size=3)


class ScriptedLLM:
    """Answers each request for concept c with the next entry of answers[c] ("" when exhausted)."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = {c: list(v) for c, v in answers.items()}
        self.requests = []

    def chat(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            prompt = r.messages[-1]["content"]
            concept = next(c for c in self.answers if c in prompt)
            queue = self.answers[concept]
            out.append(ChatResult(text=queue.pop(0) if queue else ""))
        return out


def files_of(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ captions
def test_clean_captions_formats():
    text = """Sure! Here are 4 captions:

1. "A steaming bowl of ramen sits on a wooden counter in a busy Tokyo shop."
2) **A bowl of ramen** glows under neon lights on a rainy night
- Caption 3: Ramen noodles lifted with chopsticks above a bowl, soft window light.
4. Ramen.
5. A cat sleeps on a warm windowsill in the afternoon sun.

Enjoy!"""
    caps = clean_captions(text, "ramen")
    assert caps == ["A steaming bowl of ramen sits on a wooden counter in a busy Tokyo shop.",
                    "A bowl of ramen glows under neon lights on a rainy night.",
                    "Ramen noodles lifted with chopsticks above a bowl, soft window light."]
    # without the concept requirement the cat caption is kept; "Ramen." is too short either way
    assert len(clean_captions(text, "ramen", require_concept=False)) == 4
    assert clean_captions("", "x") == [] and clean_captions(None, "x") == []
    assert clean_captions("I'm sorry, I cannot help with that.", "x") == []
    one_line = "A plate of paella, with shrimp and mussels, on a sunny terrace by the sea."
    assert clean_captions(one_line, "paella") == [one_line]          # commas do not split a caption


def test_clean_captions_long_and_cut_answers():
    long = ("The apple pie sits on a rustic table by the window. Steam rises in the morning light. "
            "Behind it a cat sleeps on a chair and the garden is full of roses and old trees and birds")
    assert clean_captions(long, "apple pie", max_words=12) == ["The apple pie sits on a rustic table by the window."]
    assert clean_captions(long, "apple pie", max_words=25) == [
        "The apple pie sits on a rustic table by the window. Steam rises in the morning light."]
    # one unfinished sentence (cut by max_new_tokens) is kept, closed with a period
    assert clean_captions("A bowl of ramen on a wooden counter with", "ramen") == [
        "A bowl of ramen on a wooden counter with."]
    assert clean_captions("Ramen noodles in a bowl. " + "very " * 80 + "long", "ramen") == [
        "Ramen noodles in a bowl."]


def test_render_and_template():
    t = load_template()
    assert "{concept}" in t
    r = render(t, "crème brûlée {n} {concept}")
    assert "crème brûlée {n} {concept}" in r                 # braces in a concept stay literal


def test_fallbacks_distinct():
    fb = fallback_captions("tea", 12)
    assert len(set(fb)) == 12 and all(c.startswith("a photo of tea,") for c in fb)


def test_write_captions_retries_then_falls_back():
    llm = ScriptedLLM({
        "apple pie": [
            "1. A slice of apple pie on a porcelain plate by the window.",       # attempt 0, j=0
            "Sure! Here is one:\n\n**A slice of apple pie on a porcelain plate by the window**",  # dup
            "I'm sorry, I cannot do that.",                                      # attempt 0, j=2
            "Apple pie cooling on a rack in a farm kitchen.",                    # attempt 1
            "A warm apple pie at a picnic in the park.",                         # attempt 1
        ],
        "🍕/../x": ["no concept here at all", "", "A 🍕/../x sits on a plate in a small Naples pizzeria.",
                    "short 🍕/../x"],
    })
    caps = write_captions(llm, ["apple pie", "🍕/../x"], n_cap=3, seed=7, template=load_template(),
                          max_attempts=3, progress=False)
    assert [c for c, fb in caps.captions["apple pie"]] == [
        "A slice of apple pie on a porcelain plate by the window.",
        "Apple pie cooling on a rack in a farm kitchen.",
        "A warm apple pie at a picnic in the park."]
    odd = caps.captions["🍕/../x"]
    assert odd[0] == ("A 🍕/../x sits on a plate in a small Naples pizzeria.", False)
    assert [fb for _, fb in odd] == [False, True, True] and caps.n_fallback == 2
    assert odd[1][0].startswith("a photo of 🍕/../x,")
    # attempt 0: 3 + 3 requests; attempt 1: 2 + 2; attempt 2: 0 + 2 → 12 requests, all seeds distinct
    assert len(llm.requests) == 12 and len({r.seed for r in llm.requests}) == 12
    assert llm.requests[0].seed == derive_seed(7, "caption", "apple pie", 0, 0)
    assert len(caps.transcripts) == 12 and caps.transcripts[0]["attempt"] == 0
    rows = caps.rows()
    assert [(r["concept"], r["caption_idx"]) for r in rows][:3] == [("apple pie", 0), ("apple pie", 1),
                                                                     ("apple pie", 2)]
    # the same backend answers → the same captions
    again = write_captions(ScriptedLLM({"apple pie": ["A slice of apple pie on a porcelain plate by the window."]}),
                           ["apple pie"], n_cap=1, seed=7, template=load_template(), progress=False)
    assert again.captions["apple pie"] == [("A slice of apple pie on a porcelain plate by the window.", False)]


def test_params_validation():
    with pytest.raises(ParamsError, match="resolution"):
        DiffusionParams(resolution=60)
    with pytest.raises(ParamsError, match="scheduler"):
        DiffusionParams(scheduler="magic")
    with pytest.raises(ParamsError, match="shard_size"):
        GenerateParams(shard_size=20_000)
    with pytest.raises(ParamsError, match="cpu_threads"):
        DiffusionParams(cpu_threads=0)
    with pytest.raises(ParamsError, match="max_fallback_fraction"):
        GenerateParams(max_fallback_fraction=1.5)


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
    p = GenerateParams(n_cap=2, n_synth=3, seed=0, shard_size=5)
    m1 = generate(CAPS, sd_dir, tmp_path / "out1", tmp_path / "cache1", p, D, progress=False)
    assert m1["n_images"] == 12 and m1["n_shards"] == 3 and m1["n_shards_generated"] == 3
    assert m1["n_captions"] == 4 and m1["n_fallback_captions"] == 1 and m1["seconds_per_image"] > 0
    generate(CAPS, sd_dir, tmp_path / "out2", tmp_path / "cache2", p, D, progress=False)
    assert files_of(tmp_path / "out1") == files_of(tmp_path / "out2")       # same seed → same bytes
    # rerun on the finished cache: nothing drawn, same bytes
    m3 = generate(CAPS, sd_dir, tmp_path / "out1", tmp_path / "cache1", p, D, progress=False)
    assert m3["n_shards_resumed"] == 3 and m3["n_shards_generated"] == 0
    assert files_of(tmp_path / "out1") == files_of(tmp_path / "out2")
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
    generate(CAPS, sd_dir, tmp_path / "out1", tmp_path / "cache1", GenerateParams(n_cap=2, n_synth=1,
             shard_size=5), D, progress=False)
    assert sorted(p.name for p in (tmp_path / "cache1" / "shards").glob("*.tar")) == ["generated-000000.tar"]


def test_regenerate_one_image_alone(sd_dir, tmp_path):
    from pas.models.diffusion import load_pipeline

    p = GenerateParams(n_cap=2, n_synth=3, seed=0, shard_size=100)
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
from pas.collect.captions import Captions
from pas.collect.generate import DiffusionParams, GenerateParams, generate
caps = Captions({caps!r})
generate(caps, {model!r}, {out!r}, {cache!r}, GenerateParams(n_cap=2, n_synth={n_synth}, shard_size=4),
         DiffusionParams(steps=2, guidance=3.0, resolution=64, batch_size=3), progress=False)
"""


def test_sigkill_and_resume(sd_dir, tmp_path):
    n_synth = 6                                      # 4 captions × 6 = 24 images = 6 shards of 4
    p = GenerateParams(n_cap=2, n_synth=n_synth, shard_size=4)
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
        if len(list((cache / "shards").glob("*.done.json"))) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"worker ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(list((cache / "shards").glob("*.done.json")))
    assert 2 <= done < 6
    assert not out.exists() or not list(out.glob("*.tar"))           # the out is written only at the end
    m = generate(CAPS, sd_dir, out, cache, p, D, progress=False)
    assert m["n_shards_resumed"] == done and m["n_shards_generated"] == 6 - done
    assert files_of(out) == files_of(tmp_path / "ref")
    assert not [q for q in (cache / "shards").iterdir() if q.name.startswith(".tmp")]


def test_tampered_shard_is_redone(sd_dir, tmp_path):
    p = GenerateParams(n_cap=2, n_synth=2, shard_size=4)
    generate(CAPS, sd_dir, tmp_path / "out", tmp_path / "cache", p, D, progress=False)
    ref = files_of(tmp_path / "out")
    tar = tmp_path / "cache" / "shards" / "generated-000001.tar"
    data = tar.read_bytes()
    tar.unlink()                                       # never write in place: it may be hard-linked
    tar.write_bytes(data[:-1024])
    m = generate(CAPS, sd_dir, tmp_path / "out", tmp_path / "cache", p, D, progress=False)
    assert m["n_shards_generated"] == 1 and m["n_shards_resumed"] == 1
    assert files_of(tmp_path / "out") == ref


def test_hostile_concepts_stay_inside(sd_dir, tmp_path):
    hostile = ["../../etc/passwd", "/abs", 'q"uo\'te', "🍕🍣", "x" * 1000, "a\\b", "nul\x00", ".."]
    caps = Captions({c: [(f"a photo of {c}.", True)] for c in hostile})
    root = tmp_path / "data"
    m = generate(caps, sd_dir, root / "generated", root / ".cache" / "generate",
                 GenerateParams(n_cap=1, n_synth=1, shard_size=3), D, progress=False)
    assert m["n_images"] == len(hostile)
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert all(f.startswith(("data/generated/", "data/.cache/generate/")) for f in files)
    assert {s.meta["concept"] for s in iter_samples(root / "generated")} == set(hostile)


# ----------------------------------------------------------------------------------------- the stage
def test_stage_main_with_cached_captions(sd_dir, tmp_path, monkeypatch):
    """The stage end to end; captions come from the scratch cache (written as the stage would), so no
    LLM is loaded — the real-LLM run is the slow test below."""
    import pandas as pd

    from pas.collect.generate import cached_captions
    from pas.llm import spec_from_dict

    write_parquet(pd.DataFrame({"concept": ["ramen", "apple pie", "nope"], "accepted": [True, True, False]}),
                  tmp_path / "bank.parquet")
    l4 = {"backend": "transformers", "model": str(tmp_path / "no-llm-here")}
    (tmp_path / "params.yaml").write_text(json.dumps({
        "n_cap": 2, "n_synth": 2, "seed": 0, "generate": {"shard_size": 3},
        "diffusion": {"steps": 2, "batch_size": 4, "guidance": 3.0, "cpu_threads": 1}, "llm": {"l4": l4}}))
    p = GenerateParams(n_cap=2, n_synth=2, shard_size=3)
    fp = caption_fingerprint(["apple pie", "ramen"], p, load_template(), l4, None)
    cached_captions(tmp_path / "cache", fp, lambda: CAPS)
    spec_from_dict(l4, "llm.l4")
    stage = load_stage("generate")
    argv = ["--concepts", str(tmp_path / "bank.parquet"), "--model", str(sd_dir), "--out", str(tmp_path / "gen"),
            "--cache", str(tmp_path / "cache"), "--metrics", str(tmp_path / "m.json"),
            "--params", str(tmp_path / "params.yaml")]
    assert stage.main(argv) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_images"] == 8 and m["n_shards"] == 3
    assert read_run(tmp_path / "m.json")["captions_cached"] is True
    assert len(read_parquet(tmp_path / "gen" / "index.parquet")) == 8
    tracked = (tmp_path / "m.json").read_bytes()
    # a finished run with --prune-cache: out assembled from the scratch shards, which are then dropped
    assert stage.main(argv + ["--prune-cache"]) == 0
    run = read_run(tmp_path / "m.json")
    assert run["n_shards_resumed"] == 3 and run["n_shards_generated"] == 0 and run["images_generated"] == 0
    assert (tmp_path / "m.json").read_bytes() == tracked    # resuming changes no tracked metric
    assert not (tmp_path / "cache" / "shards").exists() and (tmp_path / "cache" / "captions.json").is_file()
    assert len(list(iter_samples(tmp_path / "gen"))) == 8
    # missing model folder: clear message, exit 2
    assert stage.main(argv[:2] + ["--model", str(tmp_path / "nowhere")] + argv[4:]) == 2


def test_captions_after_failed_requests_are_not_cached(tmp_path):
    from pas.collect.generate import cached_captions

    failed = Captions({"tea": [("A cup of tea on a table.", False), ("a photo of tea.", True)]},
                      [{"concept": "tea", "attempt": 0, "answer": "", "error": "HTTP 400: bad"}])
    calls = []
    caps, cached = cached_captions(tmp_path, "fp", lambda: calls.append(1) or failed)
    assert caps is failed and not cached and not (tmp_path / "captions.json").exists()
    assert failed.n_failed_requests == 1 and failed.n_failed_fallbacks == 1
    ok = Captions({"tea": [("A cup of tea on a table.", False)]}, [{"concept": "tea", "error": None}])
    cached_captions(tmp_path, "fp", lambda: ok)
    assert cached_captions(tmp_path, "fp", lambda: failed) == (ok, True)  # once good, from the cache


def caption_server():
    """A chat-completions server on 127.0.0.1 writing one caption naming the concept (after failing
    with the statuses of its `plan`)."""
    from tests.test_llm_openai import Server

    class CaptionServer(Server):
        @staticmethod
        def answer(body):
            prompt = body["messages"][-1]["content"]
            c = next(c for c in ("apple pie", "ramen") if c in prompt)
            text = f"A fresh {c} served at table {body['seed'] % 997}."  # distinct per request
            return {"choices": [{"message": {"content": text}}]}
    return CaptionServer()


def test_stage_fails_on_failing_l4_and_recovers(sd_dir, tmp_path, caplog):
    import pandas as pd

    write_parquet(pd.DataFrame({"concept": ["ramen", "apple pie"], "accepted": [True, True]}),
                  tmp_path / "bank.parquet")
    server = caption_server()
    l4 = {"backend": "openai", "model": "m", "base_url": server.url, "retries": 1, "retry_backoff": 0.0,
          "batch_size": 1, "timeout": 5.0}
    (tmp_path / "params.yaml").write_text(json.dumps({
        "n_cap": 2, "n_synth": 1, "seed": 0, "generate": {"shard_size": 4, "max_attempts": 1},
        "diffusion": {"steps": 2, "batch_size": 4, "guidance": 3.0, "cpu_threads": 1}, "llm": {"l4": l4}}))
    stage = load_stage("generate")
    argv = ["--concepts", str(tmp_path / "bank.parquet"), "--model", str(sd_dir), "--out", str(tmp_path / "gen"),
            "--cache", str(tmp_path / "cache"), "--metrics", str(tmp_path / "m.json"),
            "--params", str(tmp_path / "params.yaml")]
    cache = tmp_path / "cache" / "captions.json"
    try:
        server.plan = [500] * 2  # before: exit 0, every caption a template, and cached
        assert stage.main(argv) == 1 and not cache.exists() and not (tmp_path / "gen").exists()
        assert "generate failed: L4 captions: llm.l4: " in caplog.text and "HTTP 500" in caplog.text
        server.plan = [400] * 3  # 3 of 4 requests fail → 75 % fallbacks > 50 %
        assert stage.main(argv) == 1 and not cache.exists()
        assert "3 of 4 captions (75%) are template fallbacks" in caplog.text
        server.plan = [400]      # 1 of 4 → 25 %: images are drawn, the fallback is not cached
        assert stage.main(argv) == 0 and not cache.exists()
        m = json.loads((tmp_path / "m.json").read_text())
        assert m["n_fallback_captions"] == 1 and m["n_failed_caption_requests"] == 1
        server.plan = []         # the server recovered: the rerun asks L4 again
        assert stage.main(argv) == 0 and cache.exists()
        m = json.loads((tmp_path / "m.json").read_text())
        assert m["n_fallback_captions"] == 0 and m["fallback_fraction"] == 0.0
        assert not read_run(tmp_path / "m.json")["captions_cached"]
    finally:
        server.close()


@pytest.mark.slow
def test_stage_with_real_smollm2(sd_dir, tmp_path, monkeypatch):
    """Real L4 (SmolLM2-135M-Instruct, offline) writing captions; measures the stage time."""
    import pandas as pd

    from pas.models.llm import OFFLINE_LLM, prepare_llm

    llm_dir = Path(os.environ.get("PAS_TEST_LLM_DIR", tmp_path / "llm"))
    if not (llm_dir / "config.json").is_file():
        prepare_llm(OFFLINE_LLM, llm_dir)
    concepts = ["apple pie", "ramen", "sushi", "paella", "croissant", "guacamole"]
    write_parquet(pd.DataFrame({"concept": concepts, "accepted": [True] * 6}), tmp_path / "bank.parquet")
    (tmp_path / "params.yaml").write_text(json.dumps({
        "n_cap": 2, "n_synth": 2, "seed": 0, "generate": {"shard_size": 8},
        "diffusion": {"steps": 2, "batch_size": 8, "guidance": 3.0, "cpu_threads": 1},
        "llm": {"l4": {"backend": "transformers", "model": str(llm_dir), "max_new_tokens": 160,
                       "batch_size": 8}}}))
    argv = ["--concepts", str(tmp_path / "bank.parquet"), "--model", str(sd_dir), "--out", str(tmp_path / "gen"),
            "--cache", str(tmp_path / "cache"), "--metrics", str(tmp_path / "m.json"),
            "--params", str(tmp_path / "params.yaml")]
    t0 = time.time()
    assert load_stage("generate").main(argv) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    print("real-LLM generate:", json.dumps(m), f"{time.time() - t0:.1f}s")
    assert m["n_captions"] == 12 and m["n_images"] == 24
    caps = read_parquet(tmp_path / "gen" / "captions.parquet")
    assert all(c.lower() in cap.lower() for c, cap in zip(caps.concept, caps.caption))
