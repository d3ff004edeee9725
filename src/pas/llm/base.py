"""The LLM interface shared by every stage that talks to a language model (concepts: L1, L2, L3;
generate: L4). One spec dict per model in params.yaml (`llm.l1` ... `llm.l4`) → :class:`LLMSpec` →
a backend (`transformers`, `vllm`, `openai`) with two calls:

- ``chat(requests) -> results``: one sampled answer per :class:`ChatRequest`, seeded per request, so an
  answer depends on its own (messages, seed) and not on what else is in the batch (vllm/openai; the
  transformers backend samples each row with its own generator, padding aside).
- ``yes_no(requests) -> verdicts``: P(yes) for a yes/no question, from the log-probabilities of the first
  answer token where the backend exposes them, from the answer text otherwise.

No heavy imports here: params validation imports this module.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

from pas.llm.parse import list_schema
from pas.params import ParamsError, build, check_choice, check_range, renamed

BACKENDS = ("transformers", "vllm", "openai")
STRUCTURED = ("auto", "json_schema", "off")
CONSTRAINED = ("vllm", "openai")  # backends that decode to a JSON schema (ChatBackend.constrained)
Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
SURROGATE = re.compile("[\ud800-\udfff]")
YES_NO_TOP_LOGPROBS = 20  # first-token candidates a yes/no verdict reads (every backend)


class LLMError(RuntimeError):
    """The model cannot serve this run at all (bad key, server unreachable, transient errors that
    outlived their retries): fatal for the stage. Per-request problems come back as `ChatResult.error`."""


def clean_text(text: str) -> str:
    """`text` with lone UTF-16 surrogates (valid in a JSON string, not encodable as UTF-8) replaced by
    U+FFFD, so an answer can be hashed, written to parquet and JSON lines."""
    return SURROGATE.sub("\ufffd", text)


@dataclass(frozen=True)
class LLMSpec:
    """One language model and how to sample it (a `llm.<name>` block of params.yaml)."""

    backend: str = "transformers"     # transformers (CPU) | vllm (GPU, offline batch) | openai (HTTP server)
    model: str = "models/llm"         # local folder (transformers, vllm) or the served model name (openai)
    temperature: float = 0.8          # 0 = greedy; small models degenerate greedily (measured), so sample
    top_p: float = 0.95               # nucleus sampling mass
    max_new_tokens: int = 256         # default answer length; a request may override it
    repetition_penalty: float = 1.1   # CTRL-style penalty on already generated/prompt tokens (1 = off)
    batch_size: int = 8               # requests per forward batch (transformers) / per HTTP wave (openai)
    base_url: str | None = None       # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None    # openai: name of the environment variable holding the key
    timeout: float = 120.0            # openai: seconds per HTTP attempt, in total (connect, wait, read):
                                      # a server trickling bytes cannot stretch it
    retries: int = 3                  # openai: extra attempts after a transient failure (5xx, 429,
                                      # timeout); when they run out the stage fails
    retry_backoff: float = 1.0        # openai: seconds before the first retry, doubled for each next one
                                      # (each wait capped at 60 s)
    device: str = "cpu"               # transformers: torch device
    threads: int = 0                  # transformers on CPU: torch threads (0 = torch default); 1 on a
                                      # shared, loaded CPU, where more threads wait on each other
    dtype: str = "float32"            # transformers/vllm: float32 | float16 | bfloat16 | auto
    max_model_len: int | None = None  # vllm: context length cap
    max_context_tokens: int | None = None  # the context prompts are budgeted against (L2's history);
                                      # None = the model's: vllm max_model_len, else the folder's
                                      # config.json; openai: the server's /models max_model_len
    quantization: str | None = None   # vllm: e.g. awq, gptq, fp8 (None = what the model folder says)
    gpu_memory_utilization: float = 0.9  # vllm
    tensor_parallel_size: int = 1     # vllm
    structured: str = "auto"          # list answers as JSON by constrained decoding (vllm: structured
                                      # outputs; openai: response_format json_schema), parsed as text
                                      # where that fails. auto = where the backend can (not transformers);
                                      # json_schema = required (refused for transformers; an openai server
                                      # refusing it fails the stage); off = text lists

    # keys of older params.yaml files (`pas.params.build`)
    REMOVED_KEYS: ClassVar[dict[str, str]] = {"cpu_threads": renamed("threads", " (0 = torch default, was null)")}

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        if not self.model:
            raise ParamsError("model: must name a model folder or served model")
        check_range("temperature", self.temperature, 0.0, None, lo_open=False)
        check_range("top_p", self.top_p, 0.0, 1.0, hi_open=False)
        check_range("max_new_tokens", self.max_new_tokens, 1, None, lo_open=False)
        check_range("repetition_penalty", self.repetition_penalty, 0.0, None)
        check_range("batch_size", self.batch_size, 1, None, lo_open=False)
        check_range("timeout", self.timeout, 0.0, None)
        check_range("threads", self.threads, 0, None, lo_open=False)
        check_range("retries", self.retries, 0, None, lo_open=False)
        check_range("retry_backoff", self.retry_backoff, 0.0, None, lo_open=False)
        check_choice("dtype", self.dtype, ("float32", "float16", "bfloat16", "auto"))
        check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, hi_open=False)
        check_range("tensor_parallel_size", self.tensor_parallel_size, 1, None, lo_open=False)
        for name in ("max_model_len", "max_context_tokens"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1, None, lo_open=False)
        if self.backend == "openai" and not self.base_url:
            raise ParamsError("base_url: required for backend openai")
        check_choice("structured", self.structured, STRUCTURED)
        if self.structured == "json_schema" and self.backend not in CONSTRAINED:
            raise ParamsError(f"structured: json_schema needs constrained decoding, which backend {self.backend} "
                              f"does not have (backends that do: {', '.join(CONSTRAINED)}); use auto or off")


def spec_from_dict(spec: Mapping[str, Any] | LLMSpec, where: str = "llm") -> LLMSpec:
    """Validate a spec mapping; errors name `where.key` (e.g. `llm.l1.temperature`)."""
    if isinstance(spec, LLMSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ParamsError(f"{where}: must be a mapping, got {type(spec).__name__}")
    return build(LLMSpec, {where: dict(spec)}, section=where)


@dataclass(frozen=True)
class LLMSection:
    """The `llm:` section of params.yaml: one spec per role of the paper (L1 generates, L2 expands,
    L3 validates, L4 writes captions). Roles may point at the same model."""

    l1: dict = field(default_factory=dict)
    l2: dict = field(default_factory=dict)
    l3: dict = field(default_factory=dict)
    l4: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role in ("l1", "l2", "l3", "l4"):
            spec_from_dict(getattr(self, role), f"llm.{role}")

    def spec(self, role: str) -> LLMSpec:
        check_choice("role", role, ("l1", "l2", "l3", "l4"))
        return spec_from_dict(getattr(self, role), f"llm.{role}")


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to continue. `seed` fixes the sample; `max_new_tokens` overrides the spec's;
    `schema` (a JSON schema, e.g. :func:`pas.llm.parse.list_schema`) is the answer's shape, which
    backends with constrained decoding enforce (see :meth:`ChatBackend.list_schema`)."""

    messages: tuple[Message, ...]
    seed: int = 0
    max_new_tokens: int | None = None
    schema: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        msgs = tuple(dict(m) for m in self.messages)
        for m in msgs:
            if set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"bad chat message {m!r}: need role in system/user/assistant and content")
            if not isinstance(m["content"], str):
                raise ValueError(f"bad chat message content {m['content']!r}: must be a string")
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError("a chat request must end with a user message")
        object.__setattr__(self, "messages", msgs)
        if self.schema is not None:
            if not isinstance(self.schema, Mapping):
                raise ValueError(f"bad schema {self.schema!r}: must be a JSON schema mapping")
            object.__setattr__(self, "schema", json.loads(json.dumps(self.schema)))

    def to_json(self) -> dict:
        out = {"messages": [dict(m) for m in self.messages], "seed": self.seed,
               "max_new_tokens": self.max_new_tokens}
        if self.schema is not None:  # only then: requests without one keep their cache keys
            out["schema"] = self.schema
        return out


@dataclass
class ChatResult:
    """The answer to one request. `logprobs`: (token, log-prob) per generated token where the backend
    reports them; `error` is set (and `text` empty) when the backend gave up on this request."""

    text: str
    logprobs: list[tuple[str, float]] | None = None
    finish_reason: str | None = None
    n_tokens: int | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        self.text = clean_text(self.text)

    @property
    def ok(self) -> bool:
        return self.error is None


# How a verdict was obtained. Only the first two are answers to the question; the others carry
# p_yes = NaN, which no threshold accepts, and are counted by the caller.
USABLE = ("logprobs", "text")
NOT_USABLE = ("unclear",   # the answer says neither yes nor no ("Maybe, it depends...")
              "unusable",  # malformed reply: non-numeric / NaN / +inf log-probs, non-text content
              "error")     # the backend gave up on this request


@dataclass
class YesNo:
    """A yes/no verdict: P(yes) and how it was obtained (one of USABLE or NOT_USABLE)."""

    p_yes: float
    text: str
    method: str

    def __post_init__(self) -> None:
        self.text = clean_text(self.text or "")

    @property
    def usable(self) -> bool:
        return self.method in USABLE


YES_WORDS = ("yes", "y", "true", "correct")
NO_WORDS = ("no", "n", "false", "incorrect")


def yes_no_from_text(text: str) -> float | None:
    """1.0 if the answer starts with yes, 0.0 with no, None when it says neither (unclear: not a
    validation, and not a "no" either)."""
    m = re.match(r"\W*([A-Za-z]+)", text or "")
    word = m.group(1).lower() if m else ""
    return 1.0 if word in YES_WORDS else 0.0 if word in NO_WORDS else None


def text_verdict(text: str) -> YesNo:
    p = yes_no_from_text(text)
    return YesNo(math.nan, text, "unclear") if p is None else YesNo(p, text, "text")


def as_logprob(value: Any) -> float | None:
    """A reported log-probability as a float, or None when it is not one: not a number ("high", None,
    True), NaN or +inf. -inf is a valid log-probability (p = 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) or value == math.inf else value


def add_logprob(top: dict[str, float], token: str, logprob: float) -> None:
    """top[token] += probability of another candidate that reads `token` (log-space sum)."""
    prev = top.get(token)
    if prev is None or prev == -math.inf:
        top[token] = logprob
    elif logprob > -math.inf:
        hi = max(prev, logprob)
        top[token] = hi + math.log(math.exp(prev - hi) + math.exp(logprob - hi))


def yes_no_from_logprobs(top: Mapping[str, float]) -> float | None:
    """P(yes) from the first token's top log-probabilities {token: logprob}: the probability mass of
    tokens that read "yes" vs "no" (any case, leading space/punctuation ignored), renormalised over
    the two. None when neither appears among the candidates."""
    p_yes = p_no = 0.0
    for tok, lp in top.items():
        word = re.sub(r"[^a-z]", "", tok.lower())
        if word in ("yes", "y"):
            p_yes += math.exp(lp)
        elif word in ("no", "n"):
            p_no += math.exp(lp)
    return None if p_yes + p_no <= 0.0 else p_yes / (p_yes + p_no)


def yes_no_verdict(candidates: Iterable[tuple[Any, Any]], text: str) -> YesNo:
    """The verdict every backend gives: P(yes) from the first token's (token, log-prob) candidates
    (candidates that read alike add up), or, when neither yes nor no is among them, from `text`.
    A candidate that is not (str, log-probability) makes the whole reply unusable: its numbers
    cannot be trusted, and reading it as "no" would silently reject the concept."""
    top: dict[str, float] = {}
    for token, logprob in candidates:
        lp = as_logprob(logprob)
        if lp is None or not isinstance(token, str):
            return YesNo(math.nan, f"unusable log-prob {logprob!r} for token {token!r}", "unusable")
        add_logprob(top, token, lp)
    p = yes_no_from_logprobs(top)
    return YesNo(p, text, "logprobs") if p is not None else text_verdict(text)


def error_verdict(error: str) -> YesNo:
    return YesNo(math.nan, error, "error")


def free_memory() -> None:
    """Give back what a dropped model held: collect it, then return CUDA's cached blocks (torch only
    if a backend already imported it)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class EngineSlot:
    """The one loaded model of a backend kind in this process, keyed by its identity: everything the
    model is loaded with (folder, dtype, tensor parallel, quantisation, max length, ...) and nothing
    it is sampled with. Backends built for different roles (L1, L2 differ in max_new_tokens only)
    share it; asking for another identity releases the current model first, so a vLLM engine holding
    90% of GPU memory is gone before the next one loads. Backends never keep the model themselves,
    so releasing the slot drops the last reference."""

    def __init__(self) -> None:
        self.key: Any = None
        self.model: Any = None

    def get(self, key: Any, load) -> Any:
        if self.model is None or self.key != key:
            self.release()
            self.model, self.key = load(), key
        return self.model

    def release(self, key: Any = None) -> None:
        """Drop the model (only if it has identity `key`, when given)."""
        if self.model is None or (key is not None and key != self.key):
            return
        self.model = self.key = None
        free_memory()


# Token counts where no tokenizer is at hand (openai): an over-estimate, so a budgeted prompt fits.
# BPE tokenizers average 3-4 UTF-8 bytes per token on English (SmolLM2 on the smoke run's L1 answers:
# benchmarks/RESULTS-token-estimate.md).
ESTIMATE_BYTES_PER_TOKEN = 2
ESTIMATE_TOKENS_PER_MESSAGE = 8     # role markers around each turn
ESTIMATE_TOKENS_PER_CHAT = 64       # generation prompt + a template's default system prompt (SmolLM2: 20)
# config.json keys vLLM reads the context length from (it takes the smallest present)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len")


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A conservative token count of a chat prompt (see ESTIMATE_* above)."""
    return ESTIMATE_TOKENS_PER_CHAT + sum(
        ESTIMATE_TOKENS_PER_MESSAGE + -(-len(m["content"].encode("utf-8", "surrogatepass")) // ESTIMATE_BYTES_PER_TOKEN)
        for m in messages)


def config_context_length(model_dir: str | Path) -> int | None:
    """The context length a model folder's config.json declares (vLLM's keys, the smallest; a nested
    `text_config` counts too), or None without one."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    found = [v for c in (cfg, cfg.get("text_config")) if isinstance(c, dict)
             for k, v in c.items() if k in CONTEXT_KEYS and isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(found) if found else None


class ChatBackend(ABC):
    """A language model behind the two calls every stage uses."""

    where = "llm"  # the params key it was built from (llm.l1, ...), for error messages
    stream_waves = 4  # chat_stream's default piece: this many batch_size waves of requests
    constrained = False  # decodes to a request's `schema` (vllm, openai); others answer in free text

    def __init__(self, spec: LLMSpec):
        self.spec = spec

    def list_schema(self, max_items: int | None = None) -> dict | None:
        """The schema a list request should carry: :func:`pas.llm.parse.list_schema` where this backend
        decodes to it and `structured` is not off, else None (a free-text list, parsed as text)."""
        if not self.constrained or self.spec.structured == "off":
            return None
        return list_schema(max_items)

    @abstractmethod
    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """One answer per request, in request order."""

    def chat_stream(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[list[int], list[ChatResult]]]:
        """The answers of `chat(requests)` piece by piece as they are done: (request indices, their
        results), each request in exactly one piece, so a caller can save progress. Default: pieces of
        `stream_waves * batch_size` requests through `chat` (answers do not depend on batch mates)."""
        step = max(1, self.stream_waves * self.spec.batch_size)
        for k in range(0, len(requests), step):
            idx = list(range(k, min(k + step, len(requests))))
            yield idx, self.chat([requests[i] for i in idx])

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens of a chat as the model sees it (chat template + generation prompt). Backends
        with a tokenizer count exactly; the default is :func:`estimate_tokens`."""
        return estimate_tokens(messages)

    def context_length(self) -> int | None:
        """Tokens a prompt and its answer may take together: `max_context_tokens` when set, else the
        model's own (None: unknown, nothing is budgeted)."""
        return self.spec.max_context_tokens or self.model_context_length()

    def model_context_length(self) -> int | None:
        """The model's context length as its backend knows it."""
        return None

    def yes_no(self, requests: Sequence[ChatRequest]) -> list[YesNo]:
        """P(yes) per request. Default: read the sampled answer (backends with log-probs override)."""
        short = [dataclasses.replace(r, max_new_tokens=4) for r in requests]
        return [text_verdict(r.text) if r.ok else error_verdict(r.error) for r in self.chat(short)]

    def identity(self) -> Any:
        """What the loaded model depends on; backends with equal identities share one model."""
        return (type(self).__name__, id(self))

    def close(self) -> None:
        """Release the model (GPU memory, sessions)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
