"""captions: L4 caption parsing/retries/fallbacks; the stage — resumable per L4 request (SIGKILL mid-run
with a counting chat-completions stand-in), failed requests never saved, the fallback threshold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from pas.collect.caption_files import read_captions
from pas.collect.captions import (CaptionsParams, clean_captions, derive_seed, fallback_captions, load_template,
                                  render, write_captions)
from pas.io.manifest import write_parquet
from pas.llm.base import ChatBackend, ChatResult, LLMSpec
from pas.llm.parse import list_schema
from pas.params import ParamsError, run_stage
from tests.helpers import read_run
from tests.stage_helpers import load_stage
from tests.test_llm_openai import Server

ROOT = Path(__file__).resolve().parents[1]


class ScriptedLLM(ChatBackend):
    """Answers each request for concept c with the next entry of answers[c] ("" when exhausted)."""

    def __init__(self, answers: dict[str, list[str]]):
        super().__init__(LLMSpec(batch_size=2))
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


class ConstrainedLLM(ScriptedLLM):
    """ScriptedLLM as a backend that decodes to a request's schema (vllm, openai)."""

    constrained = True


def test_structured_answers_are_read_as_json_and_fallbacks_counted():
    llm = ConstrainedLLM({"ramen": [
        '{"items": ["A steaming bowl of ramen on a wooden counter in Tokyo."]}',   # JSON of the schema
        '{"items": ["A bowl of ramen under neon lights, rain outside',              # cut off: nothing complete
        "A bowl of ramen beside chopsticks on a slate plate.",                       # the schema ignored
    ]})
    caps = write_captions(llm, ["ramen"], n_cap=2, seed=1, template=load_template(), max_attempts=2,
                          progress=False)
    assert all(r.schema == list_schema(1) for r in llm.requests)
    assert [c for c, fb in caps.captions["ramen"]] == ["A steaming bowl of ramen on a wooden counter in Tokyo.",
                                                        "A bowl of ramen beside chopsticks on a slate plate."]
    assert [t["parsed"] for t in caps.transcripts] == ["json", "text", "text"]
    m = caps.metrics()
    assert m["n_structured_answers"] == 1 and m["n_text_fallback_answers"] == 2 and m["n_fallback_captions"] == 0
    # a backend without constrained decoding (the offline default) asks and records exactly as before
    plain = ScriptedLLM({"ramen": ['{"items": ["A steaming bowl of ramen on a wooden counter in Tokyo."]}']})
    caps = write_captions(plain, ["ramen"], n_cap=1, seed=1, template=load_template(), progress=False)
    assert plain.requests[0].schema is None and "parsed" not in caps.transcripts[0]
    assert "n_structured_answers" not in caps.metrics()
    assert set(plain.requests[0].to_json()) == {"messages", "seed", "max_new_tokens"}   # cache keys unchanged


def test_params_validation():
    with pytest.raises(ParamsError, match="max_fallback_fraction"):
        CaptionsParams(max_fallback_fraction=1.5)
    with pytest.raises(ParamsError, match="max_words"):
        CaptionsParams(min_words=5, max_words=4)
    with pytest.raises(ParamsError, match="captions.prompt_file='nope.txt': no such file"):
        load_template("nope.txt")


class SeededLLM(ChatBackend):
    """A deterministic L4: the answer is a function of (prompt, seed), as with per-request seeding.
    Counts what it is asked; `fail` names seeds that fail (once each, or always); `stop_after` pieces
    raises KeyboardInterrupt (a run interrupted mid-way)."""

    def __init__(self, fail=(), fail_always=False, stop_after=None, batch_size=2):
        super().__init__(LLMSpec(batch_size=batch_size))
        self.stream_waves = 1
        self.fail, self.fail_always, self.stop_after = set(fail), fail_always, stop_after
        self.asked: list[tuple[str, int]] = []
        self.pieces = 0

    def chat(self, requests):
        if self.stop_after is not None and self.pieces >= self.stop_after:
            raise KeyboardInterrupt
        self.pieces += 1
        out = []
        for r in requests:
            prompt = r.messages[-1]["content"]
            self.asked.append((prompt, r.seed))
            if r.seed in self.fail:
                if not self.fail_always:
                    self.fail.discard(r.seed)
                out.append(ChatResult(text="", error="HTTP 400: planned"))
                continue
            concept = prompt.split('"')[1] if '"' in prompt else prompt
            out.append(ChatResult(text=f"A {concept} on a table, scene {r.seed % 1000}."))
        return out


def _caps(llm, answers=None, concepts=("tea", "ramen", "paella"), n_cap=3):
    template = 'Write one caption of "{concept}".'
    return write_captions(llm, list(concepts), n_cap, 0, template, max_attempts=2, progress=False,
                          answers=answers)


def test_interrupted_run_resumes_without_reasking(tmp_path):
    """Answers are saved piece by piece: interrupted after 2 pieces (4 requests), the rerun asks the
    other 5 only and writes what an uninterrupted run writes."""
    from pas.llm.cache import AnswerCache

    ref = _caps(SeededLLM())
    first = SeededLLM(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        _caps(first, AnswerCache(tmp_path, "fp"))
    assert len(first.asked) == 4
    again = SeededLLM()
    cache = AnswerCache(tmp_path, "fp")
    caps = _caps(again, cache)
    assert len(again.asked) == 5 and not set(again.asked) & set(first.asked) and cache.hits == 4
    assert caps == ref
    # a third run asks nothing; another fingerprint (model, sampling) asks everything
    assert _caps(SeededLLM(), AnswerCache(tmp_path, "fp")) == ref
    other = SeededLLM()
    _caps(other, AnswerCache(tmp_path, "fp2"))
    assert len(other.asked) == 9


def test_failed_requests_are_never_saved(tmp_path):
    from pas.llm.cache import AnswerCache

    seeds = [derive_seed(0, "caption", "tea", 0, j) for j in range(3)]
    failing = SeededLLM(fail=seeds[:2], fail_always=True)
    caps = _caps(failing, AnswerCache(tmp_path, "fp"))
    assert caps.n_failed_requests == 2 and caps.n_fallback == 0    # attempt 1 (new seeds) filled tea
    again = SeededLLM()
    caps2 = _caps(again, AnswerCache(tmp_path, "fp"))
    assert sorted(s for _, s in again.asked) == sorted(seeds[:2])   # only the failed ones are asked again
    assert caps2 == _caps(SeededLLM())


def test_answer_fingerprint_ignores_transport_knobs():
    from pas.llm.cache import answer_fingerprint

    base = LLMSpec(backend="openai", model="m", base_url="http://x/v1")
    same = answer_fingerprint(base)
    assert answer_fingerprint(LLMSpec(backend="openai", model="m", base_url="http://x/v1", timeout=9.0,
                                      retries=9, retry_backoff=0.0, max_context_tokens=99)) == same
    # structured is decided per request: a constrained request carries its schema in its cache key
    assert answer_fingerprint(LLMSpec(backend="openai", model="m", base_url="http://x/v1", structured="off")) == same
    for kw in ({"temperature": 0.1}, {"top_p": 0.5}, {"max_new_tokens": 5}, {"model": "n"}):
        assert answer_fingerprint(LLMSpec(**{"backend": "openai", "model": "m", "base_url": "http://x/v1", **kw})) != same
    assert answer_fingerprint(base, "files-a") != answer_fingerprint(base, "files-b")


def test_record_store_survives_torn_files_and_compacts(tmp_path):
    from pas.io.resume import RecordStore

    s = RecordStore(tmp_path)
    s.add({"a": {"text": "1"}})
    s.add({"b": {"text": "2"}})
    (tmp_path / "records-torn.json").write_text('{"c": {"te')          # a copy cut short
    (tmp_path / ".tmp-records-x.json").write_text('{"d": 1}')           # a write killed before its rename
    t = RecordStore(tmp_path)
    assert t.records == {"a": {"text": "1"}, "b": {"text": "2"}}
    assert t.get("a") == {"text": "1"} and t.get("zzz") is None
    assert t.compact() == 1                                             # b was not asked for
    assert RecordStore(tmp_path).records == {"a": {"text": "1"}}
    assert len(list(tmp_path.glob("records-*.json"))) == 1


# ----------------------------------------------------------------------------------------- the stage
class CaptionServer(Server):
    """A chat-completions server on 127.0.0.1 (vLLM's /v1/chat/completions) writing one caption naming
    the concept, a function of (prompt, seed), after failing with the statuses of its `plan`."""

    @staticmethod
    def answer(body):
        prompt = body["messages"][-1]["content"]
        c = next(c for c in ("apple pie", "ramen", "sushi") if c in prompt)
        return {"choices": [{"message": {"content": f"A fresh {c} served at table {body['seed'] % 997}."}}]}


def _stage_files(tmp_path, url, concepts=("ramen", "apple pie"), **captions):
    write_parquet(pd.DataFrame({"concept": list(concepts), "accepted": [True] * len(concepts)}),
                  tmp_path / "bank.parquet")
    l4 = {"backend": "openai", "model": "m", "base_url": url, "retries": 1, "retry_backoff": 0.0,
          "batch_size": 1, "timeout": 5.0}
    (tmp_path / "params.yaml").write_text(json.dumps({
        "n_cap": 2, "seed": 0, "captions": {"max_attempts": 1, **captions}, "llm": {"l4": l4}}))


def _argv(tmp_path, out="cap"):
    return ["--concepts", str(tmp_path / "bank.parquet"), "--out", str(tmp_path / out), "--cache",
            str(tmp_path / "cache"), "--metrics", str(tmp_path / f"{out}.json"), "--params",
            str(tmp_path / "params.yaml"), "--no-progress"]


def test_stage_fails_on_failing_l4_and_recovers(tmp_path, caplog):
    server = CaptionServer()
    _stage_files(tmp_path, server.url, max_fallback_fraction=0.5)
    stage = load_stage("captions")
    argv = _argv(tmp_path)
    try:
        server.plan = [500] * 2  # an outage past the retries: exit 1, nothing written
        assert stage.main(argv) == 1 and not (tmp_path / "cap").exists()
        assert "captions failed: L4: llm.l4: " in caplog.text and "HTTP 500" in caplog.text
        server.plan = [400] * 3  # 3 of 4 requests fail → 75 % fallbacks > 50 %
        assert stage.main(argv) == 1 and not (tmp_path / "cap").exists()
        assert "3 of 4 captions (75%) are template fallbacks" in caplog.text
        server.bodies.clear()
        server.plan = [400]      # only the 3 that failed are asked again (1 was saved); 1 fails: 25 %
        assert stage.main(argv) == 0 and len(server.bodies) == 3
        m = json.loads((tmp_path / "cap.json").read_text())
        assert m["n_fallback_captions"] == 1 and m["n_failed_caption_requests"] == 1 and m["n_requests"] == 4
        assert read_run(tmp_path / "cap.json")["n_requests_asked"] == 3
        server.bodies.clear()
        server.plan = []         # the server recovered: the rerun asks L4 only for the failed one
        assert stage.main(argv) == 0 and len(server.bodies) == 1
        m = json.loads((tmp_path / "cap.json").read_text())
        assert m["n_fallback_captions"] == 0 and m["fallback_fraction"] == 0.0
        assert read_run(tmp_path / "cap.json")["n_requests_cached"] == 3
        caps = read_captions(tmp_path / "cap")
        assert [len(v) for v in caps.captions.values()] == [2, 2] and caps.n_fallback == 0
    finally:
        server.close()


def test_stage_config_errors_are_one_line(tmp_path, capsys):
    _stage_files(tmp_path, "http://127.0.0.1:9/v1", prompt_file=str(tmp_path / "missing.txt"))
    assert run_stage(lambda: load_stage("captions").main(_argv(tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"params error: captions.prompt_file={str(tmp_path / 'missing.txt')!r}: no such file"]


KILLABLE = """
import runpy, sys
sys.argv = ["captions.py"] + {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_sigkill_mid_run_resumes_without_reasking(tmp_path):
    """The stage SIGKILLed while L4 is answering (issue 23: "redoes all captions after a kill"): the
    rerun asks only the requests of pieces that were not saved, never a saved one again, and writes
    the bytes of an uninterrupted run."""
    stall, release = threading.Event(), threading.Event()

    class Stalling(CaptionServer):
        calls = 0

        def answer(self, body):
            with self.lock:
                Stalling.calls += 1
                n = Stalling.calls
            if n == 6:                   # the 6th request: the killed run hangs here
                stall.set()
                release.wait(10)
            return super().answer(body)

    server = Stalling()
    try:
        _stage_files(tmp_path, server.url, concepts=("ramen", "apple pie", "sushi"), max_attempts=1)
        params = json.loads((tmp_path / "params.yaml").read_text())
        params["n_cap"] = 4                                # 12 requests, pieces of 4 (batch_size 1)
        (tmp_path / "params.yaml").write_text(json.dumps(params))
        script = KILLABLE.format(argv=_argv(tmp_path), script=str(ROOT / "stages" / "captions.py"))
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert stall.wait(60), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no 6th request"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        release.set()
        assert proc.returncode == -signal.SIGKILL and not (tmp_path / "cap").exists()
        first = [(b["messages"][-1]["content"], b["seed"]) for b in server.bodies]
        assert len(first) == 6                             # piece 1 (4) saved, piece 2 cut in its 2nd request
        server.bodies.clear()
        assert load_stage("captions").main(_argv(tmp_path)) == 0
        again = [(b["messages"][-1]["content"], b["seed"]) for b in server.bodies]
        assert len(again) == 8 and not set(again) & set(first[:4])      # saved answers are not asked again
        assert read_run(tmp_path / "cap.json")["n_requests_cached"] == 4
        # the same bytes as an uninterrupted run into a fresh cache
        argv = _argv(tmp_path, out="ref")
        argv[argv.index("--cache") + 1] = str(tmp_path / "ref_cache")
        assert load_stage("captions").main(argv) == 0
        for name in ("captions.parquet", "transcripts.jsonl"):
            assert (tmp_path / "cap" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
        assert (tmp_path / "cap.json").read_bytes() == (tmp_path / "ref.json").read_bytes()
    finally:
        release.set()
        server.close()
