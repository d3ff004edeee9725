"""pas's vLLM backend against the vLLM stand-in (tests/standins/site/vllm, the offline API of vLLM 0.30.0), which
accounts GPU memory per engine as vLLM does: the paper's roles (Mixtral L1/L2 on 2 GPUs, Llama-2 L3)
load one after another only because pas releases an engine before the next model loads."""

from __future__ import annotations

import dataclasses
import gc
import sys
from pathlib import Path

import pytest

from pas.llm import ChatRequest, make_backend
from pas.llm.parse import parse_answer, parse_list
from tests.standins.fixtures import llm_repos  # noqa: F401  (a fixture)

SITE = Path(__file__).resolve().parent / "standins" / "site"   # what the llm image has installed


@pytest.fixture
def vllm(monkeypatch):
    monkeypatch.syspath_prepend(str(SITE))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    from pas.llm.vllm_backend import ENGINE
    ENGINE.release()
    vllm.NODE.configure(gpus=2, gib=80)
    yield vllm
    ENGINE.release()
    gc.collect()


def ask(text: str, seed: int = 0) -> ChatRequest:
    return ChatRequest(({"role": "user", "content": text},), seed=seed)


def test_memory_is_accounted_per_engine_like_vllm(vllm, llm_repos):
    first = vllm.LLM(model=str(llm_repos["llama2"]), gpu_memory_utilization=0.9)
    assert vllm.NODE.free_gib(0) == pytest.approx(8.0, abs=0.01)
    with pytest.raises(ValueError, match=r"^Free memory on device cuda:0 \(8\.00/80\.00 GiB\) on startup is less "
                                         r"than desired GPU memory utilization \(0\.9, 72\.00 GiB\)\. Decrease GPU"):
        vllm.LLM(model=str(llm_repos["llama2"]))
    small = vllm.LLM(model=str(llm_repos["llama2"]), gpu_memory_utilization=0.05)    # what is left fits
    del first, small
    gc.collect()
    assert vllm.NODE.free_gib(0) == pytest.approx(80.0)
    with pytest.raises(ValueError, match=r"World size \(4\) is larger than the number of available GPUs \(2\)"):
        vllm.LLM(model=str(llm_repos["mixtral"]), tensor_parallel_size=4)
    with pytest.raises(ValueError, match="max_model_len"):
        vllm.LLM(model=str(llm_repos["llama2"]), max_model_len=8192)        # Llama-2: 4096
    with pytest.raises(TypeError, match="unexpected keyword argument 'gpu_memory'"):
        vllm.LLM(model=str(llm_repos["llama2"]), gpu_memory=0.5)
    llm = vllm.LLM(model=str(llm_repos["llama2"]))
    with pytest.raises(ValueError, match=r"decoder prompt \(length \d+\) is longer than the maximum model length "
                                         r"of 4096"):
        llm.generate("soup " * 5000, vllm.SamplingParams(max_tokens=4))


def test_paper_roles_load_one_after_another(vllm, llm_repos):
    """L1 and L2 (Mixtral, tensor parallel 2) share one engine; L3 (Llama-2) loads only after it is
    released; L4 (Mixtral again) after L3. Each holds 90% of its GPUs."""
    mixtral = {"backend": "vllm", "model": str(llm_repos["mixtral"]), "tensor_parallel_size": 2,
               "dtype": "bfloat16"}
    l1 = make_backend({**mixtral, "max_new_tokens": 1024}, "llm.l1")
    l2 = make_backend({**mixtral, "max_new_tokens": 256}, "llm.l2")
    l3 = make_backend({"backend": "vllm", "model": str(llm_repos["llama2"]), "dtype": "float16",
                       "max_new_tokens": 4}, "llm.l3")
    l4 = make_backend({**mixtral, "max_new_tokens": 96}, "llm.l4")
    gen = (Path(__file__).resolve().parents[1] / "src/pas/prompts/concepts_generate.txt").read_text()
    listed = l1.chat([ask(gen.format(name="food", description="dishes and foods"), seed=1)])[0]
    assert listed.ok and len(listed.text.splitlines()) == 30 and listed.finish_reason == "stop"
    more = l2.chat([ask('Now list other specific food concepts that are similar to "ramen": ...')])[0]
    assert "ramen" in more.text and vllm.NODE.free_gib(1) == pytest.approx(8.0, abs=0.01)
    yes, no = l3.yes_no([ask('Is "spicy ramen" a concept of this domain? Answer Yes or No.'),
                         ask('Is "wooden table" a concept of this domain? Answer Yes or No.')])
    assert yes.method == no.method == "logprobs" and yes.p_yes > 0.9 > 0.1 > no.p_yes
    assert vllm.NODE.free_gib(1) == pytest.approx(80.0)          # Mixtral's second GPU is free again
    cap = l4.chat([ask("Write one sentence describing a photograph of ramen.\nAnswer with that one sentence.",
                       seed=3)])[0]
    assert "ramen" in cap.text and cap.text.endswith(".")
    l4.close()
    gc.collect()
    assert vllm.NODE.free_gib(0) == vllm.NODE.free_gib(1) == pytest.approx(80.0)


def test_an_engine_still_referenced_blocks_the_next_model(vllm, llm_repos):
    """What the accounting catches: a caller keeping the first engine alive (no release) cannot load
    the second model, as on a real GPU."""
    from pas.llm.vllm_backend import ENGINE

    l1 = make_backend({"backend": "vllm", "model": str(llm_repos["mixtral"])}, "llm.l1")
    l1.chat([ask("hello")])
    kept = ENGINE.model
    l3 = make_backend({"backend": "vllm", "model": str(llm_repos["llama2"])}, "llm.l3")
    with pytest.raises(ValueError, match="Free memory on device cuda:0"):
        l3.chat([ask("hello")])
    del kept
    gc.collect()
    assert l3.chat([ask("hello")])[0].ok


def test_list_requests_are_decoded_to_their_schema(vllm, llm_repos):
    """backend vllm hands a list request's schema to the engine as SamplingParams(structured_outputs=
    StructuredOutputsParams(json=schema)) (the current API; guided_decoding is gone), and the answer is
    JSON of the schema; a plain request stays free text."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    with pytest.raises(TypeError, match="guided_decoding"):
        SamplingParams(guided_decoding={"json": {}})
    with pytest.raises(ValueError, match="one kind of structured outputs"):
        StructuredOutputsParams(json={}, regex="x")
    seen = []
    original = vllm.LLM.generate

    def spy(self, prompts, sampling_params=None, use_tqdm=True, **kw):
        seen.extend(sampling_params)
        return original(self, prompts, sampling_params, use_tqdm, **kw)

    l1 = make_backend({"backend": "vllm", "model": str(llm_repos["mixtral"]), "max_new_tokens": 1024}, "llm.l1")
    schema = l1.list_schema(12)
    gen = (Path(__file__).resolve().parents[1] / "src/pas/prompts/concepts_generate.txt").read_text()
    prompt = gen.format(name="food", description="dishes and foods")
    vllm.LLM.generate = spy
    try:
        listed, plain = l1.chat([ChatRequest(({"role": "user", "content": prompt},), seed=1, schema=schema),
                                 ask(prompt, seed=1)])
    finally:
        vllm.LLM.generate = original
    assert isinstance(seen[0].structured_outputs, StructuredOutputsParams) and seen[0].structured_outputs.json == schema
    assert seen[1].structured_outputs is None
    parsed = parse_answer(listed.text, schema)
    assert parsed.source == "json" and len(parsed.items) == 12
    assert parsed.items == parse_list(plain.text).items[:12]            # the same sample, as JSON
    off = make_backend({"backend": "vllm", "model": str(llm_repos["mixtral"]), "structured": "off"}, "llm.l1")
    assert off.list_schema() is None


def test_discovery_counts_structured_answers_and_text_fallbacks(vllm, llm_repos):
    """§3.1 on backend vllm: L1 and L2 answer JSON of the list schema (counted `_structured`); L1 cut off
    by max_new_tokens is not valid JSON, parsed as a text list instead (counted `_text_fallback`)."""
    from pas.concepts.discovery import discover
    from pas.concepts.params import ConceptsParams, DomainParams

    llm = make_backend({"backend": "vllm", "model": str(llm_repos["mixtral"])}, "llm.l1")
    domain = DomainParams(name="food", description="dishes and foods")
    p = ConceptsParams(max_generation_samples=2, generation_batch=2, max_expansion_rounds=1, validator="embedding",
                       history_samples=1, generation_max_new_tokens=1024, expansion_max_new_tokens=128)
    found = discover(llm, llm, domain, p, progress=False)
    n_b0 = found.B0_size
    assert found.answers["generate_structured"] == 2 and "generate_text_fallback" not in found.answers
    assert found.answers["expand_structured"] == n_b0 and found.answers["expand_ok"] == n_b0
    assert all(t["text"].startswith('{"items": [') for t in found.transcripts)
    cut = discover(llm, llm, domain, dataclasses.replace(p, generation_max_new_tokens=40, max_expansion_rounds=0),
                   progress=False)
    assert cut.answers["generate_text_fallback"] == 2 and "generate_structured" not in cut.answers
    assert cut.B0_size > 0 and not any("items" in c or "{" in c for c in cut.bank)   # its complete items
