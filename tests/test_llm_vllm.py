"""vLLM backend request building, without vllm installed: pure kwargs, then the call flow against a
stand-in `vllm` module that records what it is given (the real one is CUDA-only).

The stand-in follows the offline API of vLLM as pinned by containers/llm.def (v0.30.0; unchanged in
these respects since 0.6): `LLM(**engine_kwargs)`, `LLM.get_tokenizer()`, `LLM.generate(prompts,
sampling_params=[SamplingParams per prompt], use_tqdm=...)` where a prompt is a string (which vLLM
tokenises *with* special tokens, i.e. adds BOS) or a TokensPrompt `{"prompt_token_ids": [...]}`, and
`RequestOutput.outputs[0]` with text, token_ids, logprobs ({token id: Logprob} per step), finish_reason."""

from __future__ import annotations

import dataclasses
import gc
import sys
import types
import weakref
from dataclasses import dataclass

import pytest

from pas.llm import ChatRequest, make_backend
from pas.llm.base import LLMSpec
from pas.llm.vllm_backend import engine_kwargs, sampling_kwargs


def req(text, seed=0, n=None):
    return ChatRequest(({"role": "system", "content": "sys"}, {"role": "user", "content": text}), seed=seed,
                       max_new_tokens=n)


def test_sampling_kwargs_per_request_seed():
    spec = LLMSpec(backend="vllm", model="/m", temperature=0.7, top_p=0.9, repetition_penalty=1.05,
                   max_new_tokens=64)
    assert sampling_kwargs(spec, req("a", seed=7)) == {
        "n": 1, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05, "max_tokens": 64, "seed": 7,
        "logprobs": 0}
    assert sampling_kwargs(spec, req("a", seed=8, n=5))["max_tokens"] == 5
    yn = sampling_kwargs(spec, req("a", seed=3), yes_no=True)
    assert yn["max_tokens"] == 1 and yn["logprobs"] == 20 and yn["temperature"] == 0.0 and yn["seed"] == 3


def test_engine_kwargs():
    spec = LLMSpec(backend="vllm", model="models/llm", dtype="bfloat16", max_model_len=4096,
                   tensor_parallel_size=2)
    kw = engine_kwargs(spec)
    assert kw["model"] == "models/llm" and kw["dtype"] == "bfloat16" and kw["max_model_len"] == 4096
    assert kw["tensor_parallel_size"] == 2
    assert "max_model_len" not in engine_kwargs(LLMSpec(backend="vllm"))


@dataclass
class Logprob:
    logprob: float
    decoded_token: str
    rank: int = 1


BOS = 1


class FakeTokenizer:
    """A Llama-2-like tokenizer: the chat template starts with <s>; encode() adds BOS by default."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "<s>" + "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=True):
        ids = [BOS if w == "<s>" else 100 + len(w) for w in text.replace("<s>", " <s> ").split()]
        return ([BOS] if add_special_tokens else []) + ids


def token_ids(prompt):
    """What vLLM feeds the model for a prompt: a string is tokenised with special tokens (BOS)."""
    return FakeTokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt["prompt_token_ids"])


class FakeLLM:
    built: list = []                 # engine kwargs, in build order
    live = weakref.WeakSet()         # engines not yet collected
    live_at_build: list = []         # how many engines were alive when each was built

    def __init__(self, **kw):
        FakeLLM.live_at_build.append(len(FakeLLM.live))
        self.kw = kw
        self.calls = []
        FakeLLM.built.append(kw)
        FakeLLM.live.add(self)

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append((prompts, sampling_params))
        outs = []
        for p, sp in zip(prompts, sampling_params):
            ids = token_ids(p)
            if sp.kw["max_tokens"] == 1:
                top = {5: Logprob(-0.5, "Yes"), 6: Logprob(-1.0, "No"), 7: Logprob(-3.0, " yes")}
                comp = types.SimpleNamespace(text="Yes", token_ids=[5], logprobs=[top], finish_reason="length")
            else:
                comp = types.SimpleNamespace(text=f" answer seed={sp.kw['seed']} ", token_ids=[1, 2],
                                             logprobs=[{1: Logprob(-0.1, "an")}, {2: Logprob(-0.2, "swer")}],
                                             finish_reason="stop")
            outs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[comp]))
        return outs


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from pas.llm.vllm_backend import ENGINE
    ENGINE.release()
    FakeLLM.built.clear()
    FakeLLM.live_at_build.clear()
    yield mod
    ENGINE.release()


def test_chat_flow(fake_vllm):
    from pas.llm.vllm_backend import ENGINE

    llm = make_backend({"backend": "vllm", "model": "models/llm", "temperature": 0.6})
    out = llm.chat([req("hi", seed=1), req("yo", seed=2, n=9)])
    assert [r.text for r in out] == ["answer seed=1", "answer seed=2"]
    assert out[0].logprobs == [("an", -0.1), ("swer", -0.2)] and out[0].n_tokens == 2
    engine = ENGINE.model
    assert engine.kw["model"] == "models/llm"
    prompts, params = engine.calls[0]
    assert [p.kw["seed"] for p in params] == [1, 2] and params[1].kw["max_tokens"] == 9
    llm.chat([req("again")])
    assert len(FakeLLM.built) == 1  # the engine is built once


def test_prompt_has_one_bos(fake_vllm):
    """The chat template already starts with BOS; a string prompt got a second one from generate."""
    from pas.llm.vllm_backend import ENGINE

    make_backend({"backend": "vllm"}).chat([req("hi")])
    make_backend({"backend": "vllm"}).yes_no([req("Is paella food?")])
    calls = ENGINE.model.calls
    assert len(calls) == 2
    for prompts, _ in calls:
        ids = token_ids(prompts[0])
        assert ids[0] == BOS and ids.count(BOS) == 1


def test_roles_share_an_engine_and_another_model_releases_it(fake_vllm, monkeypatch):
    """L1 and L2 differ only in sampling (max_new_tokens, temperature): one engine. L3 is another
    model: the first engine is gone (and CUDA's cache emptied) before L3's is built."""
    emptied = []
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True,
                                                                  empty_cache=lambda: emptied.append(1)))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    base = {"backend": "vllm", "model": "models/llm/mixtral", "tensor_parallel_size": 2, "dtype": "bfloat16"}
    l1 = make_backend({**base, "max_new_tokens": 1024}, "llm.l1")
    l2 = make_backend({**base, "max_new_tokens": 256, "temperature": 0.5}, "llm.l2")
    l3 = make_backend({"backend": "vllm", "model": "models/llm/llama2_13b", "dtype": "float16"}, "llm.l3")
    assert l1.identity() == l2.identity() != l3.identity()
    l1.chat([req("a")])
    l2.chat([req("b", n=7)])
    assert len(FakeLLM.built) == 1
    sp = fake_vllm.SamplingParams  # sampling settings went with each call
    from pas.llm.vllm_backend import ENGINE
    (_, p1), (_, p2) = ENGINE.model.calls
    assert p1[0].kw["max_tokens"] == 1024 and p2[0].kw["max_tokens"] == 7 and p2[0].kw["temperature"] == 0.5
    assert sp is FakeSamplingParams
    l3.yes_no([req("c")])
    assert [k["model"] for k in FakeLLM.built] == ["models/llm/mixtral", "models/llm/llama2_13b"]
    assert FakeLLM.live_at_build == [0, 0] and emptied  # released (del + gc + empty_cache) first
    l3.close()
    gc.collect()
    assert len(FakeLLM.live) == 0 and ENGINE.model is None


def test_yes_no_sums_variants(fake_vllm):
    import math
    v = make_backend({"backend": "vllm"}).yes_no([req("Is paella food?")])[0]
    p_yes = math.exp(-0.5) + math.exp(-3.0)
    assert v.method == "logprobs" and v.p_yes == pytest.approx(p_yes / (p_yes + math.exp(-1.0)))


def test_missing_vllm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="run-in llm"):
        make_backend({"backend": "vllm"}).chat([req("x")])


def test_identity_is_what_the_engine_is_built_from():
    """Keyed by model, dtype, tensor parallel, quantisation, max length (+ memory share): another value
    of any is another engine; sampling settings and the history budget are per call."""
    from pas.llm.vllm_backend import engine_identity

    base = LLMSpec(backend="vllm", model="/m", dtype="bfloat16", tensor_parallel_size=2)
    same = [dict(temperature=0.1, top_p=0.5, max_new_tokens=7, repetition_penalty=1.3, batch_size=64,
                 max_context_tokens=1000)]
    other = [dict(model="/n"), dict(dtype="float16"), dict(tensor_parallel_size=4), dict(quantization="awq"),
             dict(max_model_len=4096), dict(gpu_memory_utilization=0.5)]
    for kw in same:
        assert engine_identity(dataclasses.replace(base, **kw)) == engine_identity(base)
    ids = {engine_identity(dataclasses.replace(base, **kw)) for kw in other}
    assert len(ids) == len(other) and engine_identity(base) not in ids


def test_count_tokens_and_context_length(fake_vllm, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768, "n_positions": 4096}))
    msgs = ({"role": "user", "content": "List 30 dishes"}, {"role": "assistant", "content": "1. Paella"},
            {"role": "user", "content": "More like paella"})
    llm = make_backend({"backend": "vllm", "model": str(tmp_path)})
    assert llm.context_length() == 4096                    # vLLM's keys, the smallest present
    assert make_backend({"backend": "vllm", "model": str(tmp_path), "max_model_len": 2048}).context_length() == 2048
    assert make_backend({"backend": "vllm", "model": str(tmp_path), "max_context_tokens": 900}).context_length() == 900
    assert make_backend({"backend": "vllm", "model": str(tmp_path / "none")}).context_length() is None
    ids = llm.prompts([ChatRequest(msgs)])[0]["prompt_token_ids"]
    assert llm.count_tokens(msgs) == len(ids) and ids.count(BOS) == 1
