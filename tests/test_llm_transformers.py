"""Transformers backend: the per-row seeded sampler (fast), and the real offline SmolLM2-135M (slow)."""

from __future__ import annotations

import pytest
import torch

from pas.llm import ChatRequest, make_backend
from pas.llm.base import yes_no_from_logprobs, yes_no_from_text
from pas.llm.transformers_backend import _RowSampler


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_row_sampler_seeded_and_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    a = _RowSampler(_gens(1, 2, 3), temperature=1.0, top_p=1.0)
    b = _RowSampler(_gens(1, 2, 3), temperature=1.0, top_p=1.0)
    alone = _RowSampler(_gens(2), temperature=1.0, top_p=1.0)
    toks_a, toks_b, toks_alone = [], [], []
    for _ in range(20):
        toks_a.append(a(None, logits).argmax(-1).tolist())
        toks_b.append(b(None, logits).argmax(-1).tolist())
        toks_alone.append(alone(None, logits[1:2]).argmax(-1).item())
    assert toks_a == toks_b
    assert [t[1] for t in toks_a] == toks_alone            # row 1 does not depend on its batch mates
    assert len({tuple(t) for t in toks_a}) > 1              # it does sample
    out = a(None, logits)
    assert torch.isinf(out).sum().item() == 3 * 49 and (out == 0).sum().item() == 3  # one-hot rows


def test_row_sampler_top_p_and_temperature():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s = _RowSampler(_gens(0, 1), temperature=1.0, top_p=0.5)  # row 0: p(top) ≈ 0.98 ≥ 0.5 → only it
    picks = [s(None, logits).argmax(-1).tolist() for _ in range(30)]
    assert all(p[0] == 0 for p in picks) and len({p[1] for p in picks}) > 1
    cold = _RowSampler(_gens(0), temperature=0.01, top_p=1.0)
    assert all(cold(None, torch.tensor([[1.0, 1.2, 0.9]])).argmax(-1).item() == 1 for _ in range(20))
    assert s.logprobs[0][0] == pytest.approx(0.0, abs=1e-6)  # the only kept token has log-prob 0


def test_yes_no_helpers():
    assert yes_no_from_text("Yes, it is.") == 1.0 and yes_no_from_text(" no.") == 0.0
    assert yes_no_from_text("Maybe") is None and yes_no_from_text("") is None  # unclear: no verdict
    assert yes_no_from_logprobs({"Yes": -0.1, " no": -2.0, "The": -0.5}) == pytest.approx(
        0.904837 / (0.904837 + 0.135335), rel=1e-5)
    assert yes_no_from_logprobs({"Hello": -0.1}) is None


def test_count_tokens_and_context_length(tmp_path):
    """Exact prompt tokens with the model's own tokenizer and chat template (no BOS added twice);
    the context length from the folder's config.json (no model weights needed for either)."""
    from transformers import AutoTokenizer

    from pas.llm.transformers_backend import MODEL, _Loaded
    from tests.llm_helpers import bos_tokenizer

    folder = bos_tokenizer(tmp_path / "llm", max_position_embeddings=8192)
    llm = make_backend({"backend": "transformers", "model": str(folder)})
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    MODEL.get(llm.identity(), lambda: _Loaded(tok, None, []))
    try:
        msgs = ({"role": "user", "content": "List 30 dishes."}, {"role": "assistant", "content": "1. Paella"},
                {"role": "user", "content": "More like paella?"})
        text = tok.apply_chat_template(list(msgs), add_generation_prompt=True, tokenize=False)
        assert llm.count_tokens(msgs) == len(text.encode()) - len("<s>") + 1   # one token per byte, one BOS
        assert llm.context_length() == 8192
        capped = make_backend({"backend": "transformers", "model": str(folder), "max_context_tokens": 100})
        assert capped.context_length() == 100
    finally:
        MODEL.release()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from pas.models.llm import prepare_llm
    path = prepare_llm(out_dir=tmp_path_factory.mktemp("models") / "llm")
    llm = make_backend({"backend": "transformers", "model": str(path), "max_new_tokens": 24, "batch_size": 4,
                        "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1, "threads": 1})
    yield llm
    llm.close()


def _req(text, seed, n=None):
    return ChatRequest(({"role": "user", "content": text},), seed=seed, max_new_tokens=n)


@pytest.mark.slow
def test_smollm2_chat_seeded(smol):
    reqs = [_req("List three fruits.", 1), _req("List three fruits.", 2), _req("Name a color.", 1, n=6)]
    out = smol.chat(reqs)
    again = smol.chat(reqs)
    assert [r.text for r in out] == [r.text for r in again]             # same seed → same answer
    assert all(r.text and r.error is None for r in out)
    assert out[2].n_tokens <= 6 and out[0].n_tokens <= 24
    assert out[0].finish_reason in ("stop", "length")
    assert len(out[0].logprobs) == out[0].n_tokens and all(lp <= 0 for _, lp in out[0].logprobs)
    alone = smol.chat([reqs[0]])
    assert alone[0].text == out[0].text                                   # not tied to batch mates here
    assert smol.render(reqs[0]).endswith("<|im_start|>assistant\n")       # the chat template is used


@pytest.mark.slow
def test_smollm2_yes_no_logprobs(smol):
    v = smol.yes_no([_req("Is pizza a food? Answer Yes or No.", 0), _req("Is a hammer a food? Answer Yes or No.", 0)])
    assert all(x.method == "logprobs" and 0.0 <= x.p_yes <= 1.0 for x in v)
