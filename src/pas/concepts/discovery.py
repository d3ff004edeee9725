"""Stage 1 of PaS (§3.1): in-domain LLM-guided concept discovery — generation, expansion, validation.

    Generation:  C_N = ⋃_{n ≤ N} G_{L1}(n_D, d_D; seed_n);  stop when |C_N \\ C_{N-1}| < λ1·|C_{N-1}|;  B_0 = C_N
    Expansion:   B_{i+1} = B_i ∪ ⋃_{c ∈ B_i} E_{L2}(n_D, d_D, B_i, c)  (L1 conversation as history);
                 stop when |B_{i+1} \\ B_i| < λ2·|B_i|
    Validation:  B = {c ∈ ⋃_i B_i : V_{L3}(n_D, d_D, c) = True}  (one fixed seed)

Every |·| counts normalised concepts (:func:`pas.concepts.normalize.normalize_concept`). The stopping
rules are strict: equality continues. Caps (max samples, max rounds, max concepts) stop a loop early and
are reported as its stop reason, warned about and listed in `Discovery.cap_stops`: in the paper
λ1 and λ2 end the loops, so a capped run is not the paper's B.

L2's history is budgeted to its context: the L1 conversation ("used as historic data" to show L2
the established set B_0) must leave room, in L2's own tokens, for the round's longest expansion prompt
and its answer. When all of it does not fit, whole L1 samples are kept in the order that shows L2 the
most of B_0 (each next one adds the most concepts the kept ones do not name; ties: the earlier),
in their original order, and the rest dropped: counted per round (`Discovery.history_kept/dropped`).

L1 and L2 requests carry the list schema where their backend decodes to it (`llm.<role>.structured`,
:meth:`ChatBackend.list_schema`); such an answer is read from its JSON, and one that is not valid
JSON of the schema is parsed as a text list: counted as `<step>_structured` / `<step>_text_fallback`
in `Discovery.answers` (absent when no request carried a schema).

An unusable answer (backend error, empty, refusal, no list) is counted and skipped. No usable L1
sample up to the cap, no list in L2's first round, or a round of failed L2 requests raises
:class:`DiscoveryError`: an empty or frozen bank from a dead LLM is not a result.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Sequence

from tqdm import tqdm

from pas.concepts.normalize import normalize_all
from pas.concepts.params import ConceptsParams, DomainParams
from pas.llm.base import ChatBackend, ChatRequest, ChatResult
from pas.llm.parse import parse_answer
from pas.seeds import derive_seed

log = logging.getLogger(__name__)
CAP_STOPS = ("max_generation_samples", "max_expansion_rounds", "max_concepts")


class DiscoveryError(RuntimeError):
    """§3.1 cannot give a result: an LLM gave no usable answer."""


def unusable_summary(results: Sequence[ChatResult], statuses: Sequence[str]) -> str:
    """'3 error (first: HTTP 400 ...), 1 refusal' for the answers of a failed loop."""
    counts = Counter(statuses)
    first_error = next((r.error for r in results if r.error), None)
    parts = [f"{n} {s}" + (f" (first: {first_error[:160]})" if s == "error" and first_error else "")
             for s, n in sorted(counts.items())]
    return ", ".join(parts)


def load_prompt(name: str) -> str:
    """A prompt template shipped in `pas/prompts/<name>.txt`."""
    return resources.files("pas.prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8").strip()


def saturated(n_new: int, prev_size: int, lam: float) -> bool:
    """The paper's stopping rule |X_new \\ X_prev| < λ·|X_prev| (strict: equality does not stop)."""
    return n_new < lam * prev_size


@dataclass
class Prompts:
    generate: str
    expand: str

    @classmethod
    def default(cls) -> "Prompts":
        return cls(load_prompt("concepts_generate"), load_prompt("concepts_expand"))


@dataclass
class Discovery:
    """What generation + expansion found, before validation."""

    bank: dict[str, dict]                  # concept -> {first_iteration, origin, sample}
    generation_sizes: list[int]            # |C_n| for n = 1..N
    generation_new: list[int]              # |C_n \ C_{n-1}|
    expansion_sizes: list[int]             # |B_i| for i = 0..rounds
    expansion_new: list[int]               # |B_{i+1} \ B_i|
    generation_drawn: int                  # L1 samples read, usable or not (≥ N)
    generation_stop: str                   # lambda_1 | max_generation_samples | max_concepts
    expansion_stop: str                    # lambda_2 | max_expansion_rounds | max_concepts | empty
    transcripts: list[dict] = field(default_factory=list)
    answers: Counter = field(default_factory=Counter)  # "<step>_<status>" -> count
    history_kept: list[int] = field(default_factory=list)     # L1 samples in L2's history, per round
    history_dropped: list[int] = field(default_factory=list)  # L1 samples cut to fit L2's context, per round
    history_context: int | None = None     # L2's context length the history was budgeted to (None: unknown)

    @property
    def cap_stops(self) -> list[str]:
        """The loops ("generation", "expansion") that a cap stopped rather than their λ rule."""
        return [loop for loop, stop in (("generation", self.generation_stop), ("expansion", self.expansion_stop))
                if stop in CAP_STOPS]

    @property
    def B0_size(self) -> int:
        return self.expansion_sizes[0] if self.expansion_sizes else 0


def _keys(result: ChatResult, step: str, where: str, answers: Counter, schema: dict | None = None
          ) -> tuple[list[str], str]:
    """Normalised concepts of one answer (dups removed, order kept) and its parse status. `schema`:
    the request's; its answer is read as JSON where it follows it, as a text list otherwise."""
    if result.error:
        answers[f"{step}_error"] += 1
        log.warning("%s: backend error: %s", where, result.error)
        return [], "error"
    parsed = parse_answer(result.text, schema)
    answers[f"{step}_{parsed.status}"] += 1
    if schema is not None:
        answers[f"{step}_{'structured' if parsed.source == 'json' else 'text_fallback'}"] += 1
    if parsed.status != "ok":
        log.warning("%s: malformed answer (%s): %r", where, parsed.status, result.text[:200])
    answers[f"{step}_dropped_lines"] += len(parsed.dropped)
    return normalize_all(parsed.items), parsed.status


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def generate_initial(llm: ChatBackend, domain: DomainParams, p: ConceptsParams, prompts: Prompts,
                     bank: dict[str, dict], transcripts: list[dict], answers: Counter,
                     progress: bool = True):
    """Sample L1 with seeds seed_1, seed_2, ... until saturation; fills `bank` with B_0 = C_N.

    Samples are drawn `generation_batch` at a time for throughput; the rule is checked after each
    single sample n, and samples drawn beyond the stopping N are logged as unused, not counted.
    An answer with no parseable list (empty, refusal, prose, backend error) is logged and counted
    but is not a step n of the rule: it is no evidence of saturation. `max_generation_samples` caps
    all drawn samples, usable or not.
    Returns (sizes, new_counts, stop_reason, conversations of the used samples, samples drawn).
    """
    prompt = prompts.generate.format(name=domain.name, description=domain.description)
    messages = (_user(prompt),)
    sizes, news, conversations = [], [], []
    stop = None
    n = 0
    bar = tqdm(total=p.max_generation_samples, desc="concepts: L1 samples", disable=not progress)
    while stop is None:
        todo = range(n + 1, min(n + p.generation_batch, p.max_generation_samples) + 1)
        reqs = [ChatRequest(messages, seed=derive_seed(p.seed, "generate", k),
                            max_new_tokens=p.generation_max_new_tokens, schema=llm.list_schema()) for k in todo]
        results = llm.chat(reqs)
        for k, req, res in zip(todo, reqs, results):
            rec = {"step": "generate", "sample": k, "seed": req.seed, "messages": list(req.messages),
                   "text": res.text, "error": res.error, "used": stop is None, "status": None}
            transcripts.append(rec)
            if stop is not None:
                continue
            n = k
            bar.update(1)
            keys, rec["status"] = _keys(res, "generate", f"L1 sample {k}", answers, req.schema)
            if not keys:  # no list in this answer: not a step of C_N (an unusable answer says nothing
                rec["used"] = False  # about saturation); logged, counted, and the next seed is drawn
                if k >= p.max_generation_samples:
                    stop = "max_generation_samples"
                continue
            prev = len(bank)
            new = [c for c in keys if c not in bank]
            room = p.max_concepts - prev
            for c in new[:room]:
                bank[c] = {"first_iteration": 0, "origin": None, "sample": k}
            sizes.append(len(bank))
            news.append(len(new[:room]))
            conversations.append((req.messages, res.text, keys))
            if len(new) > room:
                stop = "max_concepts"
            elif saturated(len(new), prev, p.lambda_1):
                stop = "lambda_1"
            elif k >= p.max_generation_samples:
                stop = "max_generation_samples"
    bar.close()
    if not sizes:
        drawn = [t for t in transcripts if t["step"] == "generate" and t["status"] is not None]
        raise DiscoveryError(
            f"L1 gave no usable answer in {n} samples: " + unusable_summary(
                [ChatResult(t["text"], error=t["error"]) for t in drawn], [t["status"] for t in drawn]))
    return sizes, news, stop, conversations, n


def history_messages(conversations: Sequence[tuple]) -> list[dict]:
    """The L1 conversation given to L2 as history: (prompt, answer) turns of the samples
    (conversations: (request messages, answer[, concept keys]) per used sample)."""
    msgs: list[dict] = []
    for request_msgs, answer, *_ in conversations:
        msgs += [dict(m) for m in request_msgs]
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def coverage_order(concepts_per_sample: Sequence[Sequence[str]]) -> list[int]:
    """Sample indices, each next the one naming the most concepts that the ones before do not (ties:
    the earlier sample); samples that add nothing follow in their order."""
    covered: set[str] = set()
    left = list(range(len(concepts_per_sample)))
    order = []
    while left:
        gain = [len(set(concepts_per_sample[i]) - covered) for i in left]
        best = max(gain)
        if best == 0:
            return order + left
        i = left.pop(gain.index(best))
        order.append(i)
        covered.update(concepts_per_sample[i])
    return order


def fit_history(llm: ChatBackend, conversations: Sequence[tuple], final: dict, max_new_tokens: int
                ) -> tuple[list[dict], int]:
    """(history messages, samples dropped): the L1 samples whose turns, followed by `final` (the round's
    longest expansion prompt), leave `max_new_tokens` of L2's context free, counted with its own
    tokenizer (:meth:`ChatBackend.count_tokens`). All of them when they fit or the context is unknown;
    else in :func:`coverage_order`, each that still fits, kept in their original order."""
    context = llm.context_length()
    everything = history_messages(conversations)
    if context is None or llm.count_tokens(everything + [final]) + max_new_tokens <= context:
        return everything, 0
    kept: list[int] = []
    for i in coverage_order([keys for _, _, keys in conversations]):
        trial = sorted(kept + [i])
        msgs = history_messages([conversations[j] for j in trial])
        if llm.count_tokens(msgs + [final]) + max_new_tokens <= context:
            kept = trial
    return history_messages([conversations[j] for j in kept]), len(conversations) - len(kept)


def expand(llm: ChatBackend, domain: DomainParams, p: ConceptsParams, prompts: Prompts,
           bank: dict[str, dict], conversations: Sequence[tuple], transcripts: list[dict], answers: Counter,
           progress: bool = True):
    """Rounds i = 0, 1, ...: ask L2 for concepts similar to every c in B_i; B_{i+1} = B_i ∪ answers.
    The history (`conversations`: the used L1 samples) is fitted to L2's context each round.

    Returns (sizes |B_0|, |B_1|, ..., new counts, stop reason, history samples kept and dropped per round)."""
    sizes, news = [len(bank)], []
    kept_per_round: list[int] = []
    dropped_per_round: list[int] = []
    asked_before: set[str] = set()
    budgeted = llm.context_length() is not None

    def done(stop):
        return sizes, news, stop, kept_per_round, dropped_per_round

    for i in range(p.max_expansion_rounds):
        targets = [c for c in bank if not (p.expand_new_only and c in asked_before)]
        if not targets:
            return done("empty")
        asked_before.update(targets)
        finals = [_user(prompts.expand.format(name=domain.name, description=domain.description, concept=c))
                  for c in targets]
        longest = max(finals, key=lambda m: llm.count_tokens([m])) if budgeted else finals[0]
        history, dropped = fit_history(llm, conversations, longest, p.expansion_max_new_tokens)
        kept_per_round.append(len(conversations) - dropped)
        dropped_per_round.append(dropped)
        if dropped:
            log.warning("L2 round %d: %d of %d L1 samples dropped from the history to fit L2's context of %d "
                        "tokens", i + 1, dropped, len(conversations), llm.context_length())
        reqs = [ChatRequest(tuple(history) + (final,), seed=derive_seed(p.seed, "expand", i, c),
                            max_new_tokens=p.expansion_max_new_tokens, schema=llm.list_schema())
                for c, final in zip(targets, finals)]
        results: list[ChatResult] = []
        chunk = llm.spec.batch_size * 4  # progress granularity only (batch_size ≥ 1: LLMSpec checks it)
        for k in tqdm(range(0, len(reqs), chunk), desc=f"concepts: L2 round {i + 1}", disable=not progress):
            results += llm.chat(reqs[k:k + chunk])
        prev = len(bank)
        added: dict[str, dict] = {}
        statuses = []
        for c, req, res in zip(targets, reqs, results):
            keys, status = _keys(res, "expand", f"L2 round {i + 1} concept {c!r}", answers, req.schema)
            statuses.append(status)
            for k in keys:
                if k not in bank and k not in added:
                    added[k] = {"first_iteration": i + 1, "origin": c, "sample": None}
            transcripts.append({"step": "expand", "round": i + 1, "concept": c, "seed": req.seed,
                                "prompt": req.messages[-1]["content"], "history_turns": len(history),
                                "text": res.text, "error": res.error, "status": status})
        # L2 down or broken would read as saturation (nothing new): fail when every request of a round
        # failed, or when round 1 (every concept of B_0) got no list at all. Later rounds may
        # legitimately get nothing new.
        if all(st == "error" for st in statuses) or (i == 0 and "ok" not in statuses):
            raise DiscoveryError(f"L2 round {i + 1}: none of {len(statuses)} answers was usable: "
                                 + unusable_summary(results, statuses))
        room = p.max_concepts - prev
        for k in list(added)[:room]:
            bank[k] = added[k]
        sizes.append(len(bank))
        news.append(min(len(added), room))
        if len(added) > room:
            return done("max_concepts")
        if saturated(len(added), prev, p.lambda_2):
            return done("lambda_2")
    return done("max_expansion_rounds")


def discover(l1: ChatBackend, l2: ChatBackend, domain: DomainParams, p: ConceptsParams,
             prompts: Prompts | None = None, progress: bool = True) -> Discovery:
    """Generation with L1 then expansion with L2 (history = the L1 conversation)."""
    prompts = prompts or Prompts.default()
    bank: dict[str, dict] = {}
    transcripts: list[dict] = []
    answers: Counter = Counter()
    g_sizes, g_new, g_stop, conversations, drawn = generate_initial(l1, domain, p, prompts, bank, transcripts,
                                                             answers, progress)
    kept, dropped = [], []
    if g_stop == "max_concepts":
        e_sizes, e_new, e_stop = [len(bank)], [], "max_concepts"
    else:
        e_sizes, e_new, e_stop, kept, dropped = expand(l2, domain, p, prompts, bank, conversations[:p.history_samples],
                                                       transcripts, answers, progress)
    found = Discovery(bank, g_sizes, g_new, e_sizes, e_new, drawn, g_stop, e_stop, transcripts, answers,
                      kept, dropped, l2.context_length())
    for loop in found.cap_stops:
        stop = g_stop if loop == "generation" else e_stop
        log.warning("§3.1 %s stopped at the cap concepts.%s, not by λ%s: raise the cap to let λ decide",
                    loop, stop, 1 if loop == "generation" else 2)
    return found


def validate_bank(discovery: Discovery, score: Callable[[list[str]], list[float]], threshold: float
                  ) -> tuple[list[float], list[bool]]:
    """V(c) = score(c) ≥ threshold for every concept of ⋃_i B_i (bank order)."""
    concepts = list(discovery.bank)
    scores = list(score(concepts)) if concepts else []
    if len(scores) != len(concepts):
        raise RuntimeError(f"validator returned {len(scores)} scores for {len(concepts)} concepts")
    return scores, [s >= threshold for s in scores]
