"""vLLM backend request building, without vllm installed: pure kwargs, then the call flow against a
stand-in `vllm` module that records what it is given (the real one is CUDA-only)."""

from __future__ import annotations

import sys
import types
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


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeLLM:
    instances: list = []

    def __init__(self, **kw):
        self.kw = kw
        self.calls = []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append((prompts, sampling_params))
        outs = []
        for p, sp in zip(prompts, sampling_params):
            if sp.kw["max_tokens"] == 1:
                top = {5: Logprob(-0.5, "Yes"), 6: Logprob(-1.0, "No"), 7: Logprob(-3.0, " yes")}
                comp = types.SimpleNamespace(text="Yes", token_ids=[5], logprobs=[top], finish_reason="length")
            else:
                comp = types.SimpleNamespace(text=f" answer seed={sp.kw['seed']} ", token_ids=[1, 2],
                                             logprobs=[{1: Logprob(-0.1, "an")}, {2: Logprob(-0.2, "swer")}],
                                             finish_reason="stop")
            outs.append(types.SimpleNamespace(prompt=p, outputs=[comp]))
        return outs


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances.clear()
    return mod


def test_chat_flow(fake_vllm):
    llm = make_backend({"backend": "vllm", "model": "models/llm", "temperature": 0.6})
    out = llm.chat([req("hi", seed=1), req("yo", seed=2, n=9)])
    assert [r.text for r in out] == ["answer seed=1", "answer seed=2"]
    assert out[0].logprobs == [("an", -0.1), ("swer", -0.2)] and out[0].n_tokens == 2
    engine = FakeLLM.instances[0]
    assert engine.kw["model"] == "models/llm"
    prompts, params = engine.calls[0]
    assert prompts[0] == "<system>sys<user>hi<assistant>"
    assert [p.kw["seed"] for p in params] == [1, 2] and params[1].kw["max_tokens"] == 9
    llm.chat([req("again")])
    assert len(FakeLLM.instances) == 1  # the engine is built once


def test_yes_no_sums_variants(fake_vllm):
    import math
    v = make_backend({"backend": "vllm"}).yes_no([req("Is paella food?")])[0]
    p_yes = math.exp(-0.5) + math.exp(-3.0)
    assert v.method == "logprobs" and v.p_yes == pytest.approx(p_yes / (p_yes + math.exp(-1.0)))


def test_missing_vllm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="run-in llm"):
        make_backend({"backend": "vllm"}).chat([req("x")])
