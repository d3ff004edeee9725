"""`vllm.sampling_params` of the stand-in: `SamplingParams` and `StructuredOutputsParams` with the fields
and checks of vLLM's own (0.30.0); a field vLLM does not have is a TypeError."""

from __future__ import annotations

from dataclasses import dataclass, field

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:   # vLLM's check: exactly one kind of constraint
        count = sum(getattr(self, k) is not None for k in CONSTRAINTS)
        if count > 1:
            raise ValueError("You can only use one kind of structured outputs constraint but multiple are "
                             f"specified: {self.__dict__}")
        if count < 1:
            raise ValueError("You must use one kind of structured outputs constraint but none are specified: "
                             f"{self.__dict__}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:   # vLLM's own checks of these fields
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be StructuredOutputsParams, got "
                            f"{type(self.structured_outputs).__name__}")


__all__ = ["SamplingParams", "StructuredOutputsParams"]
