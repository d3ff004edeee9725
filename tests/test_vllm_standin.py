"""pas's vLLM backend against the vLLM stand-in (tests/standins/site/vllm, the offline API of vLLM 0.30.0), which
accounts GPU memory per engine as vLLM does: the paper's roles (Mixtral L1/L2 on 2 GPUs, Llama-2 L3)
load one after another only because pas releases an engine before the next model loads."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

from pas.llm import ChatRequest, make_backend
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
