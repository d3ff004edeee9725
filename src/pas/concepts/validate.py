"""Concept validators V(n_D, d_D, c) → score; a concept is kept when score ≥ `validator_threshold`.

- ``llm`` (the paper's L3, one fixed seed): P(yes) to "is c a concept of D?", from the first answer
  token's log-probabilities where the backend reports them, from the answer text otherwise. A
  verdict that is not an answer (failed request, malformed reply, neither yes nor no) scores NaN,
  which no threshold accepts, and is counted by method; no usable verdict at all fails the run.
- ``embedding``: cosine between the sentence embedding of c and of the domain anchor
  ("{name}: {description}"). Needed offline: SmolLM2-135M answers "No" to everything (measured), so
  it cannot validate; all-MiniLM-L6-v2 ranks toy food/non-food items sensibly.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from pas.concepts.discovery import DiscoveryError
from pas.concepts.params import DomainParams
from pas.llm.base import ChatBackend, ChatRequest


class LLMValidator:
    def __init__(self, llm: ChatBackend, domain: DomainParams, template: str, seed: int):
        self.llm, self.domain, self.template, self.seed = llm, domain, template, seed
        self.verdicts: list = []

    def requests(self, concepts: Sequence[str]) -> list[ChatRequest]:
        return [ChatRequest(({"role": "user", "content": self.template.format(
                    name=self.domain.name, description=self.domain.description, concept=c)},),
                    seed=self.seed, max_new_tokens=4) for c in concepts]

    def __call__(self, concepts: Sequence[str]) -> list[float]:
        self.verdicts = self.llm.yes_no(self.requests(concepts))
        if concepts and not any(v.usable for v in self.verdicts):
            first = next((v.text for v in self.verdicts if v.method in ("error", "unusable")), "")
            raise DiscoveryError(f"L3 gave no usable verdict for {len(concepts)} concepts: "
                                 + ", ".join(f"{n} {m}" for m, n in sorted(self.counts().items()))
                                 + (f" (first: {first[:160]})" if first else ""))
        return [v.p_yes for v in self.verdicts]

    def counts(self) -> Counter:
        """Verdicts by method: logprobs, text (answers), unclear, unusable, error (not answers)."""
        return Counter(v.method for v in self.verdicts)


class EmbeddingValidator:
    def __init__(self, model, domain: DomainParams, anchor_template: str):
        self.model = model
        self.anchor = anchor_template.format(name=domain.name, description=domain.description)

    def __call__(self, concepts: Sequence[str]) -> list[float]:
        from pas.models.text_embed import embed_texts

        a = embed_texts(self.model, [self.anchor])          # (1, d)
        e = embed_texts(self.model, list(concepts))          # (n, d)
        return (e @ a[0]).astype(float).tolist()             # (n,) cosine, both L2-normalised
