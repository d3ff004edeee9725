"""§3.1 loops with a scripted deterministic backend: stopping rules (hand-computed, incl. equality),
expansion with history, validation filtering, caps, malformed answers; a brute-force property test."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pas.concepts.discovery import (DiscoveryError, Prompts, derive_seed, discover, history_messages,
                                    saturated, validate_bank)
from pas.concepts.params import ConceptsParams, DomainParams
from pas.llm.base import ChatBackend, ChatResult, LLMSpec
from pas.llm.parse import list_schema
from pas.params import ParamsError

PROMPTS = Prompts(generate="GEN {name} | {description}", expand="EXP {concept}")
DOMAIN = DomainParams(name="food", description="dishes")


class Scripted(ChatBackend):
    """L1 answers in sample order; L2 answers from expand[(round, concept)] (round counted per concept)."""

    def __init__(self, gen=(), expand=None, errors=()):
        super().__init__(LLMSpec(backend="transformers", model="scripted", batch_size=2))
        self.gen = list(gen)
        self.expand = expand or {}
        self.errors = set(errors)
        self.requests = []
        self.asked: dict[str, int] = {}
        self.n_gen = 0

    def chat(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            last = r.messages[-1]["content"]
            if last.startswith("GEN"):
                self.n_gen += 1
                k = self.n_gen
                if k in self.errors:
                    out.append(ChatResult(text="", error="boom"))
                    continue
                out.append(ChatResult(text=self.gen[k - 1] if k <= len(self.gen) else ""))
            else:
                c = last[4:]
                self.asked[c] = self.asked.get(c, 0) + 1
                out.append(ChatResult(text=self.expand.get((self.asked[c], c), "")))
        return out


def params(**kw):
    base = dict(lambda_1=0.25, lambda_2=0.5, max_expansion_rounds=0, generation_batch=1, validator="embedding",
                validator_threshold=0.5)
    base.update(kw)
    return ConceptsParams(**base)


def test_saturated_is_strict():
    assert saturated(0, 10, 0.01)
    assert not saturated(1, 100, 0.01)      # 1 < 1.0 is false: equality continues
    assert saturated(0, 100, 0.01)
    assert not saturated(0, 0, 0.5)          # an empty C never saturates
    assert saturated(2, 9, 0.25)             # 2 < 2.25


def test_generation_stops_at_hand_computed_N():
    # λ1 = 0.25: n=1 new 4 (prev 0) go; n=2 new 1 vs 0.25·4 = 1.0 → equality, go; n=3 new 1 < 1.25 → stop
    llm = Scripted(gen=["1. A\n2. B\n3. C\n4. D", "a, b, e", "- A\n- F", "G, H, I, J, K"])
    d = discover(llm, llm, DOMAIN, params(lambda_1=0.25), PROMPTS, progress=False)
    assert d.generation_sizes == [4, 5, 6]
    assert d.generation_new == [4, 1, 1]
    assert d.generation_stop == "lambda_1"
    assert list(d.bank) == ["a", "b", "c", "d", "e", "f"]
    assert d.bank["e"] == {"first_iteration": 0, "origin": None, "sample": 2}


def test_generation_equality_boundary_continues_one_more():
    # λ1 = 0.2: n=2 1 < 0.8? no; n=3 1 < 1.0? no (equality); n=4 new 0 < 1.2 → stop at N = 4
    llm = Scripted(gen=["a, b, c, d", "a, e", "f", "a, b", "z"])
    d = discover(llm, llm, DOMAIN, params(lambda_1=0.2), PROMPTS, progress=False)
    assert d.generation_sizes == [4, 5, 6, 6]
    assert d.generation_stop == "lambda_1"


def test_batched_sampling_same_answer_unused_samples_logged():
    gen = ["a, b, c, d", "a, b, e", "a, f", "x, y, z"]
    one = discover(Scripted(gen=gen), Scripted(), DOMAIN, params(), PROMPTS, progress=False)
    l1 = Scripted(gen=gen)
    four = discover(l1, Scripted(), DOMAIN, params(generation_batch=4), PROMPTS, progress=False)
    assert one.bank == four.bank and one.generation_sizes == four.generation_sizes == [4, 5, 6]
    used = [t["used"] for t in four.transcripts if t["step"] == "generate"]
    assert used == [True, True, True, False]         # sample 4 drawn in the batch, not counted
    seeds = [r.seed for r in l1.requests]
    assert seeds == [derive_seed(0, "generate", k) for k in (1, 2, 3, 4)] and len(set(seeds)) == 4


def test_expansion_hand_computed_with_history():
    # B0 = {a, b}. Round 1: a→a1,a2  b→b1: new 3 vs 0.5·2 = 1 → go (B1 = 5).
    # Round 2 (every c in B1 again): a→a1 (dup), a1→x: new 1 < 0.5·5 → stop. Sizes 2, 5, 6.
    gen = ["a, b", "a, b"]  # n=2: new 0 < 0.25·2 → B0 = {a, b}
    exp = {(1, "a"): "1. a1\n2. A2.", (1, "b"): "b1", (2, "a"): "a1", (1, "a1"): "* x"}  # (k-th ask, c)
    l1, l2 = Scripted(gen=gen), Scripted(expand=exp)
    d = discover(l1, l2, DOMAIN, params(max_expansion_rounds=5), PROMPTS, progress=False)
    assert d.expansion_sizes == [2, 5, 6] and d.expansion_new == [3, 1]
    assert d.expansion_stop == "lambda_2"
    assert d.bank["x"] == {"first_iteration": 2, "origin": "a1", "sample": None}
    assert d.bank["a2"]["origin"] == "a" and d.bank["b1"]["first_iteration"] == 1
    assert len(l2.requests) == 2 + 5  # every concept of B_i is asked each round (paper)
    hist = list(l2.requests[0].messages[:-1])
    assert hist == [{"role": "user", "content": "GEN food | dishes"}, {"role": "assistant", "content": "a, b"},
                    {"role": "user", "content": "GEN food | dishes"}, {"role": "assistant", "content": "a, b"}]
    assert l2.requests[0].messages[-1]["content"] == "EXP a"


def test_expansion_equality_boundary_and_new_only():
    # λ2 = 0.5, |B0| = 2: round 1 adds exactly 1 = 0.5·2 → continue; round 2 adds 0 → stop
    gen = ["a, b", "b"]
    exp = {(1, "a"): "c"}
    d = discover(Scripted(gen=gen), Scripted(expand=exp), DOMAIN, params(max_expansion_rounds=5), PROMPTS,
                 progress=False)
    assert d.expansion_sizes == [2, 3, 3] and d.expansion_stop == "lambda_2"
    l2 = Scripted(expand=exp)
    d2 = discover(Scripted(gen=gen), l2, DOMAIN, params(max_expansion_rounds=5, expand_new_only=True),
                  PROMPTS, progress=False)
    assert d2.expansion_sizes == [2, 3, 3]
    assert [r.messages[-1]["content"] for r in l2.requests] == ["EXP a", "EXP b", "EXP c"]


def test_history_limit():
    conv = [(({"role": "user", "content": "q"},), "ans1"), (({"role": "user", "content": "q"},), "ans2")]
    assert history_messages(conv[:1]) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans1"}]
    assert len(history_messages(conv)) == 4 and history_messages(conv[:0]) == []


def test_caps_are_stop_reasons(caplog):
    never = [f"w{k}a, w{k}b" for k in range(10)]  # 2 new each time, never saturates at λ1 = 0.25
    d = discover(Scripted(gen=never), Scripted(), DOMAIN, params(max_generation_samples=3), PROMPTS,
                 progress=False)
    assert d.generation_sizes == [2, 4, 6] and d.generation_stop == "max_generation_samples"
    assert d.expansion_stop == "max_expansion_rounds" and d.expansion_sizes == [6]
    assert d.cap_stops == ["generation", "expansion"]
    assert "generation stopped at the cap concepts.max_generation_samples, not by λ1" in caplog.text
    assert "expansion stopped at the cap concepts.max_expansion_rounds, not by λ2" in caplog.text
    caplog.clear()
    d = discover(Scripted(gen=["a, b", "a"]), Scripted(expand={(1, "a"): "c"}), DOMAIN,
                 params(max_expansion_rounds=3), PROMPTS, progress=False)
    assert d.cap_stops == [] and "stopped at the cap" not in caplog.text  # λ1 and λ2 decided

    d = discover(Scripted(gen=never), Scripted(), DOMAIN, params(max_concepts=5), PROMPTS, progress=False)
    assert len(d.bank) == 5 and d.generation_stop == "max_concepts" and d.expansion_stop == "max_concepts"

    exp = {(r, c): f"{c}-{r}x, {c}-{r}y" for r in (1, 2, 3) for c in ["a", "b"]}
    d = discover(Scripted(gen=["a, b", "a"]), Scripted(expand=exp), DOMAIN,
                 params(max_expansion_rounds=1), PROMPTS, progress=False)
    assert d.expansion_sizes == [2, 6] and d.expansion_stop == "max_expansion_rounds"
    d = discover(Scripted(gen=["a, b", "a"]), Scripted(expand=exp), DOMAIN,
                 params(max_expansion_rounds=3, max_concepts=4), PROMPTS, progress=False)
    assert list(d.bank) == ["a", "b", "a-1x", "a-1y"] and d.expansion_stop == "max_concepts"


def test_malformed_answers_counted_never_crash():
    gen = ["", "I'm sorry, but I can't help with that.", "Here are some dishes:", "paella", "paella"]
    d = discover(Scripted(gen=gen, errors={6}), Scripted(), DOMAIN, params(lambda_1=0.5), PROMPTS, progress=False)
    assert d.answers["generate_empty"] == 1 and d.answers["generate_refusal"] == 1
    assert d.answers["generate_no_items"] == 1 and d.answers["generate_ok"] == 2
    # unusable answers are not steps of C_N: n=1 is "paella" (new 1), n=2 adds 0 < 0.5·1 → stop
    assert d.generation_sizes == [1, 1] and list(d.bank) == ["paella"] and d.generation_stop == "lambda_1"
    assert d.bank["paella"]["sample"] == 4 and d.generation_drawn == 5
    assert [t["used"] for t in d.transcripts] == [False, False, False, True, True]
    d = discover(Scripted(gen=["a", "a"], errors={1}), Scripted(), DOMAIN, params(max_generation_samples=3),
                 PROMPTS, progress=False)
    assert d.answers["generate_error"] == 1 and d.transcripts[0]["error"] == "boom"
    assert d.generation_sizes == [1] and d.generation_stop == "max_generation_samples"


def test_no_usable_answer_fails_with_one_line():
    # before: an empty bank and a "max_generation_samples" stop, i.e. a successful run
    with pytest.raises(DiscoveryError, match=r"^L1 gave no usable answer in 3 samples: 1 empty, 1 error "
                                             r"\(first: boom\), 1 refusal$"):
        discover(Scripted(gen=["", "I cannot.", "x"], errors={3}), Scripted(), DOMAIN,
                 params(max_generation_samples=3), PROMPTS, progress=False)
    # L2 round 1 without a single list: B = B_0 would look like λ2 saturation
    with pytest.raises(DiscoveryError, match=r"L2 round 1: none of 2 answers was usable: 2 empty"):
        discover(Scripted(gen=["a, b", "a"]), Scripted(), DOMAIN, params(max_expansion_rounds=3), PROMPTS,
                 progress=False)


class Failing(Scripted):
    """L2 that answers round 1, then every request fails."""

    def chat(self, requests):
        if any(r.messages[-1]["content"] == "EXP a" for r in self.requests):
            return [ChatResult(text="", error="HTTP 400: context too long") for _ in requests]
        return super().chat(requests)


def test_a_round_of_failed_requests_fails_but_an_empty_later_round_saturates():
    with pytest.raises(DiscoveryError, match=r"L2 round 2: none of 3 answers was usable: 3 error "
                                             r"\(first: HTTP 400: context too long\)"):
        discover(Scripted(gen=["a, b", "a"]), Failing(expand={(1, "a"): "c"}), DOMAIN,
                 params(max_expansion_rounds=3), PROMPTS, progress=False)
    d = discover(Scripted(gen=["a, b", "a"]), Scripted(expand={(1, "a"): "c"}), DOMAIN,
                 params(max_expansion_rounds=3), PROMPTS, progress=False)
    assert d.expansion_sizes == [2, 3, 3] and d.expansion_stop == "lambda_2"


def test_lone_surrogate_in_an_answer():
    import hashlib

    # JSON "\\udc80" decodes to a lone surrogate, which str.encode() refuses
    plain = hashlib.sha256("0\x1fexpand\x1f1\x1fa".encode()).digest()
    assert derive_seed(0, "expand", 1, "a") == int.from_bytes(plain[:4], "big") & 0x7FFFFFFF  # unchanged
    assert derive_seed(0, "expand", 1, "caf\udc80") != derive_seed(0, "expand", 1, "caf\ufffd")
    l1 = Scripted(gen=["1. caf\udc80 au lait\n2. tea", "tea"], expand={(1, "tea"): "chai"})
    d = discover(l1, l1, DOMAIN, params(max_expansion_rounds=1), PROMPTS, progress=False)
    assert list(d.bank) == ["caf\ufffd au lait", "tea", "chai"]  # ChatResult replaced the surrogate


def test_validation_filters():
    d = discover(Scripted(gen=["apple, pear, car", "apple"]), Scripted(), DOMAIN, params(), PROMPTS,
                 progress=False)
    scores, ok = validate_bank(d, lambda cs: [1.0 if c != "car" else 0.1 for c in cs], 0.5)
    assert list(d.bank) == ["apple", "pear", "car"] and ok == [True, True, False] and scores[2] == 0.1
    scores, ok = validate_bank(d, lambda cs: [0.5] * len(cs), 0.5)  # ≥ threshold accepts
    assert all(ok)
    with pytest.raises(RuntimeError, match="3 concepts"):
        validate_bank(d, lambda cs: [1.0], 0.5)


def test_unclear_l3_answers_are_not_validations():
    """"Only concepts validated by L3 are retained in the final bank of concepts" (§3.1): an answer
    that is neither yes nor no validates nothing. Before, "Maybe" scored P(yes) = 0.5 and was
    accepted at the default threshold 0.5 (≥)."""
    import math

    from pas.concepts.validate import LLMValidator

    class L3(Scripted):  # answers by text only: the base class reads yes/no from the answer
        def chat(self, requests):
            said = {"paella": "Yes.", "hammer": "No, it is a tool.", "tapas": "Maybe, it depends on the bar."}
            return [ChatResult(text=next(a for c, a in said.items() if c in r.messages[-1]["content"]))
                    for r in requests]

    d = discover(Scripted(gen=["paella, hammer, tapas", "paella"]), Scripted(), DOMAIN, params(), PROMPTS,
                 progress=False)
    v = LLMValidator(L3(), DOMAIN, "Is {concept} a kind of {name}?", seed=0)
    scores, ok = validate_bank(d, v, 0.5)
    # paella: "Yes." → 1.0 ≥ 0.5 kept; hammer: "No" → 0.0 rejected; tapas: unclear → NaN, rejected
    assert scores[:2] == [1.0, 0.0] and math.isnan(scores[2]) and ok == [True, False, False]
    assert v.counts() == {"text": 2, "unclear": 1}
    scores, ok = validate_bank(d, v, 0.0)  # not even the loosest threshold accepts it
    assert ok == [True, True, False]


def test_params_validation():
    with pytest.raises(ParamsError, match="lambda_1"):
        ConceptsParams(lambda_1=1.0)
    with pytest.raises(ParamsError, match="validator"):
        ConceptsParams(validator="magic")
    with pytest.raises(ParamsError, match="references"):
        ConceptsParams(references=("imagenet",))
    with pytest.raises(ParamsError, match="name"):
        DomainParams(name=" ")
    assert ConceptsParams(validator="embedding", validator_threshold=-0.2).validator_threshold == -0.2


def _brute_force(answers: list[list[str]], lam: float, cap: int):
    """The paper's rule on plain Python sets, sample by sample."""
    C_prev: set = set()
    sizes = []
    for ans in answers[:cap]:
        if not ans:  # an answer without items is not a step n
            continue
        C_n = C_prev | {a.lower() for a in ans}
        sizes.append(len(C_n))
        if len(C_n - C_prev) < lam * len(C_prev):
            return sizes, "lambda_1"
        C_prev = C_n
    return sizes, "max_generation_samples"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=6), min_size=1, max_size=12),
       st.sampled_from([0.05, 0.1, 0.25, 0.5, 0.9]), st.integers(1, 5))
def test_generation_matches_brute_force(answers, lam, batch):
    text = [", ".join(a) for a in answers]
    cap = len(answers)
    sizes, stop = _brute_force(answers, lam, cap)
    if not sizes:  # no answer with items: not a bank
        with pytest.raises(DiscoveryError, match="L1 gave no usable answer"):
            discover(Scripted(gen=text), Scripted(), DOMAIN,
                     params(lambda_1=lam, generation_batch=batch, max_generation_samples=cap), PROMPTS,
                     progress=False)
        return
    d = discover(Scripted(gen=text), Scripted(), DOMAIN,
                 params(lambda_1=lam, generation_batch=batch, max_generation_samples=cap), PROMPTS, progress=False)
    sizes, stop = _brute_force(answers, lam, cap)
    assert d.generation_sizes == sizes
    assert d.generation_stop == stop


def test_prompts_ship_as_files():
    p = Prompts.default()
    assert "{name}" in p.generate and "{description}" in p.generate and "{concept}" in p.expand
    dataclasses.replace(p)  # plain dataclass


@pytest.mark.parametrize("preset", ["paper-food", "paper-birds"])
def test_paper_presets_let_lambda_decide(preset):
    """The caps of the paper presets are safety nets far above the paper's |B0| = 248, |B| = 5014."""
    from pathlib import Path

    from pas.params import load

    p = load(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml")
    c = p["concepts"]
    assert c["max_generation_samples"] >= 1000 and c["max_expansion_rounds"] >= 100
    assert c["max_concepts"] >= 50_000  # ~10 × 5014
    if preset == "paper-birds":  # §3.1: n_D = "birds", d_D = "bird species"
        assert p["domain"] == {"name": "birds", "description": "bird species"}


class Budgeted(Scripted):
    """Scripted, with a context of `context` tokens counted as whitespace words + 2 per message (a
    stand-in tokenizer: what matters is that discovery counts with the backend's own)."""

    def __init__(self, context, **kw):
        super().__init__(**kw)
        self.spec = dataclasses.replace(self.spec, max_context_tokens=context)
        self.counted = 0

    def count_tokens(self, messages):
        self.counted += 1
        return sum(len(m["content"].split()) + 2 for m in messages)


def test_history_is_budgeted_to_l2s_context():
    """The paper preset's failure: history_samples null and many L1 samples overflow L2's context.
    Samples are kept by how much of B_0 they show (each that still fits), in their original order;
    every L2 prompt and its answer fit; what was cut is counted per round."""
    from pas.concepts.discovery import coverage_order, fit_history

    # new concepts per sample: 1: a b c d; 2: j; 3: e f g; 4: h; 5: i
    gen = ["a, b, c, d", "a, b, j", "e, f, g", "a, e, h", "i"]
    assert coverage_order([g.split(", ") for g in gen]) == [0, 2, 1, 3, 4]
    cost = [6 + len(g.split()) + 2 for g in gen]           # prompt turn (4 words + 2) + answer turn
    assert cost == [12, 11, 11, 11, 9]
    final, max_new = 2 + 2, 10                             # "EXP a": every concept is one word
    context = 12 + 11 + 11 + 9 + final + max_new           # samples 1-3 fit, 4 not, then 5 still does
    l2 = Budgeted(context, expand={(1, "a"): "z"})
    p = params(lambda_1=0.01, max_generation_samples=5, max_expansion_rounds=2, expansion_max_new_tokens=max_new)
    d = discover(Scripted(gen=gen), l2, DOMAIN, p, PROMPTS, progress=False)
    assert d.generation_sizes == [4, 5, 8, 9, 10] and d.expansion_sizes == [10, 11]
    assert d.history_kept == [4] and d.history_dropped == [1] and d.history_context == context
    for r in l2.requests:
        assert l2.count_tokens(r.messages) + max_new <= context
        answers = [m["content"] for m in r.messages if m["role"] == "assistant"]
        assert answers == ["a, b, c, d", "a, b, j", "e, f, g", "i"]          # original order
    # an unknown context budgets nothing; a large one keeps everything after one count
    conv = [(({"role": "user", "content": "GEN food | dishes"},), g, g.split(", ")) for g in gen]
    fin = {"role": "user", "content": "EXP a"}
    assert fit_history(Scripted(), conv, fin, max_new)[1] == 0
    big = Budgeted(10_000)
    hist, dropped = fit_history(big, conv, fin, max_new)
    assert dropped == 0 and len(hist) == 10 and big.counted == 1
    assert fit_history(Budgeted(final + max_new - 1), conv, fin, max_new) == ([], 5)   # no room at all


def test_history_budget_uses_the_rounds_longest_prompt():
    """The prompt of the longest concept of the round must fit too: a longer concept in round 2 makes
    round 2 keep fewer samples than round 1."""
    gen = ["a, b, c, d", "e, f, g"]                         # costs 12, 11
    long_name = "w1 w2 w3 w4 w5 w6 w7 w8"                   # "EXP <8 words>": 11 tokens, "EXP a": 4
    context = 12 + 11 + 4 + 5
    l2 = Budgeted(context, expand={(1, "a"): long_name})
    p = params(lambda_1=0.01, lambda_2=0.01, max_generation_samples=2, max_expansion_rounds=2,
               expansion_max_new_tokens=5)
    d = discover(Scripted(gen=gen), l2, DOMAIN, p, PROMPTS, progress=False)
    assert d.expansion_sizes == [7, 8, 8]
    assert d.history_kept == [2, 1] and d.history_dropped == [0, 1]
    assert all(l2.count_tokens(r.messages) + 5 <= context for r in l2.requests)


class ConstrainedScripted(Scripted):
    """Scripted as a backend that decodes to a request's schema (vllm, openai)."""

    constrained = True


def test_structured_answers_and_text_fallbacks_are_counted():
    gen = ['{"items": ["Paella", "Ramen", "Tacos"]}',
           '{"items": ["Paella", "Ramen", "Pad Thai", "Pho", "Sush',     # cut off: its complete items
           '1. Paella\n2. Ramen']                                        # the schema ignored: a text list
    llm = ConstrainedScripted(gen=gen)
    found = discover(llm, llm, DOMAIN, params(lambda_1=0.01, max_generation_samples=3), PROMPTS, progress=False)
    assert all(r.schema == list_schema() for r in llm.requests)
    assert list(found.bank) == ["paella", "ramen", "tacos", "pad thai", "pho"]
    assert found.answers["generate_structured"] == 1 and found.answers["generate_text_fallback"] == 2
    assert found.answers["generate_ok"] == 3
    off = ConstrainedScripted(gen=gen)
    off.spec = dataclasses.replace(off.spec, structured="off")
    plain = Scripted(gen=gen)                    # transformers: no schema, nothing new counted
    for llm in (off, plain):
        found = discover(llm, llm, DOMAIN, params(lambda_1=0.01, max_generation_samples=3), PROMPTS, progress=False)
        assert all(r.schema is None for r in llm.requests)
        assert not any(k.endswith(("_structured", "_text_fallback")) for k in found.answers)
