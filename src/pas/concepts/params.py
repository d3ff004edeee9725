"""Params of the `concepts` stage (sections `domain` and `concepts`, plus λ1, λ2, seed at top level)."""

from __future__ import annotations

from dataclasses import dataclass

from pas.params import ParamsError, check_choice, check_range

VALIDATORS = ("embedding", "llm")


@dataclass(frozen=True)
class DomainParams:
    """The domain D, given only as two strings (§3.1): its name n_D and a short description d_D."""

    name: str = "food"                 # n_D, e.g. "birds"
    description: str = "dishes and foods from every cuisine in the world"  # d_D, e.g. "bird species"

    def __post_init__(self) -> None:
        for name in ("name", "description"):
            if not getattr(self, name).strip():
                raise ParamsError(f"{name}: must not be empty")


@dataclass(frozen=True)
class ConceptsParams:
    lambda_1: float = 0.01          # λ1: stop sampling L1 when |C_N \ C_{N-1}| < λ1·|C_{N-1}|
    lambda_2: float = 0.01          # λ2: stop expanding when |B_{i+1} \ B_i| < λ2·|B_i|
    seed: int = 0                   # base of every request seed (L1 sample n, L2 round i × concept c, L3)
    max_generation_samples: int = 100  # cap on N (L1 samples); hitting it is reported as stop reason
    max_expansion_rounds: int = 10  # cap on expansion rounds i (0 = B = B_0)
    max_concepts: int = 20000       # cap on |B_i|; the round that crosses it is truncated and stops
    generation_batch: int = 8       # L1 samples drawn per batch; the stopping rule still runs per sample
    generation_max_new_tokens: int = 512  # answer length for L1 (a list of concepts)
    expansion_max_new_tokens: int = 128   # answer length for L2 (a few similar concepts)
    history_samples: int | None = None    # L1 conversations given to L2 as history (None = all N)
    expand_new_only: bool = False   # False = paper: ask L2 about every c in B_i each round
    validator: str = "llm"          # llm (L3 yes/no, paper) | embedding (sentence-embedding similarity)
    validator_threshold: float = 0.5  # accept when P(yes) ≥ it (llm) or cosine ≥ it (embedding)
    references: tuple[str, ...] = ()  # reference label sets for coverage: food101, cub200 (resources/)
    coverage_threshold: float = 0.7   # a class is covered if its nearest concept has cosine ≥ this
    coverage_bins: int = 20           # histogram bins over [0, 1] of nearest-concept cosine (dvc plots)
    coverage_embedder: str = "text_embed"  # E of the coverage cosines: text_embed (MiniLM offline) | clip
                                           # (models/clip text tower: the paper's CLIP ViT-L/14)

    def __post_init__(self) -> None:
        from pas.concepts.coverage import EMBEDDERS, REFERENCES

        check_range("lambda_1", self.lambda_1, 0.0, 1.0)
        check_range("lambda_2", self.lambda_2, 0.0, 1.0)
        for name in ("max_generation_samples", "max_concepts", "generation_batch",
                     "generation_max_new_tokens", "expansion_max_new_tokens", "coverage_bins"):
            check_range(name, getattr(self, name), 1, None, lo_open=False)
        if self.max_expansion_rounds < 0:
            raise ParamsError("max_expansion_rounds: must be ≥ 0")
        if self.history_samples is not None:
            check_range("history_samples", self.history_samples, 0, None, lo_open=False)
        check_choice("validator", self.validator, VALIDATORS)
        lo = 0.0 if self.validator == "llm" else -1.0
        check_range("validator_threshold", self.validator_threshold, lo, 1.0, lo_open=False, hi_open=False)
        check_range("coverage_threshold", self.coverage_threshold, -1.0, 1.0, lo_open=False, hi_open=False)
        for ref in self.references:
            check_choice("references", ref, sorted(REFERENCES))
        check_choice("coverage_embedder", self.coverage_embedder, EMBEDDERS)
