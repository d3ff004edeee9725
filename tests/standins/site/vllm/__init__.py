"""A stand-in for the `vllm` package: the offline-inference API of vLLM 0.30.0 (the version the base
image of containers/llm.def ships), for tests on machines without a GPU. Put `tests/standins/site` first
on `sys.path` (or PYTHONPATH) and `import vllm` finds it.

What it copies from vLLM:
- `LLM(model, *, dtype, seed, gpu_memory_utilization=0.9, tensor_parallel_size=1, max_model_len,
  quantization, ...)`: reads the model folder's `config.json` and tokenizer (transformers, as vLLM
  does); unknown engine arguments are a TypeError, as `EngineArgs(**kwargs)` makes them.
- GPU memory, as vLLM's worker accounts it: an engine takes `gpu_memory_utilization` × total memory
  on each of its `tensor_parallel_size` GPUs at start-up, and a start-up on a GPU with less free memory
  raises vLLM's own error ("Free memory on device cuda:0 (8.0/80.0 GiB) on startup is less than
  desired GPU memory utilization (0.9, 72.0 GiB). Decrease GPU memory utilization or reduce GPU memory
  used by other processes."). The memory comes back when the engine object is collected (what
  `del llm; gc.collect(); torch.cuda.empty_cache()` does for a real engine, whose engine-core
  process exits with it). The simulated node: `VLLM_STANDIN_GPUS` GPUs (default 1) of
  `VLLM_STANDIN_GPU_GIB` GiB (default 80), per process (the real count is device-wide).
- `tensor_parallel_size` above the GPU count, and `max_model_len` above the model's
  `max_position_embeddings`, are refused as vLLM refuses them; so is a prompt longer than the
  model's context ("The decoder prompt (length N) is longer than the maximum model length of M").
- `LLM.generate(prompts, sampling_params, use_tqdm)`: a prompt is a string (tokenised *with* special
  tokens, i.e. BOS added) or a TokensPrompt `{"prompt_token_ids": [...]}`; one SamplingParams or one
  per prompt; returns RequestOutput(prompt_token_ids, outputs=[CompletionOutput(text, token_ids,
  logprobs = one {token id: Logprob(logprob, rank, decoded_token)} per generated token, with the top
  `logprobs` alternatives, finish_reason "stop" | "length")]).
- Structured outputs: `SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))`, from
  `vllm.sampling_params` (the current API; `guided_decoding=GuidedDecodingParams(...)` was removed in
  0.12 and is a TypeError here as there). A constrained answer is JSON of the schema, as the grammar
  backend would force it, still cut at `max_tokens`.
- `LLM.chat(messages, sampling_params, ...)`: the tokenizer's chat template, then generate.
- `LLM.get_tokenizer()`, and `LLM.llm_engine.model_config.max_model_len` (the engine's context length).

What it does not copy: the model. Answers are scripted from the prompt (see `answers.py`: concept
lists for L1/L2, Yes/No for L3, one scene sentence for L4 captions), deterministic in (prompt, seed).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import answers
from .sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.30.0"
GiB = 1 << 30

ENGINE_ARGS = {"tokenizer", "dtype", "seed", "gpu_memory_utilization", "tensor_parallel_size", "max_model_len",
               "quantization", "trust_remote_code", "enforce_eager", "max_num_seqs", "swap_space",
               "revision", "tokenizer_mode", "download_dir", "enable_prefix_caching", "max_logprobs"}
DTYPES = {"auto", "float16", "half", "bfloat16", "float32", "float"}


class _Node:
    """The simulated GPUs of this process: bytes held by live engines per device."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used: list[int] = []
        self.total = 0
        self.configure()

    def configure(self, gpus: int | None = None, gib: float | None = None) -> None:
        gpus = int(os.environ.get("VLLM_STANDIN_GPUS", "1")) if gpus is None else gpus
        gib = float(os.environ.get("VLLM_STANDIN_GPU_GIB", "80")) if gib is None else gib
        with self.lock:
            self.used = [0] * gpus
            self.total = int(gib * GiB)

    def reserve(self, n: int, utilization: float) -> list[tuple[int, int]]:
        want = int(self.total * utilization)
        with self.lock:
            for i in range(n):
                free = self.total - self.used[i]
                if free < want:
                    raise ValueError(
                        f"Free memory on device cuda:{i} ({free / GiB:.2f}/{self.total / GiB:.2f} GiB) on "
                        f"startup is less than desired GPU memory utilization ({utilization}, "
                        f"{want / GiB:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory used "
                        "by other processes.")
            for i in range(n):
                self.used[i] += want
        return [(i, want) for i in range(n)]

    def release(self, held: list[tuple[int, int]]) -> None:
        with self.lock:
            for i, b in held:
                self.used[i] -= b

    def free_gib(self, device: int = 0) -> float:
        return (self.total - self.used[device]) / GiB


NODE = _Node()


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{unknown[0]}'")
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ValueError(f"Invalid repository ID or local directory specified: '{model}'. Please verify "
                             "the following requirements: 1. Provide a valid Hugging Face repository ID. "
                             "2. Specify a local directory that contains a recognized configuration file.")
        self.config = json.loads((path / "config.json").read_text())
        dtype = kwargs.get("dtype", "auto")
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype: {dtype!r}")
        tp = int(kwargs.get("tensor_parallel_size", 1))
        if tp > len(NODE.used):
            raise ValueError(f"World size ({tp}) is larger than the number of available GPUs "
                             f"({len(NODE.used)}) in this node. If this is intentional and you are using "
                             "Ray, please check your Ray cluster setup.")
        derived = int(self.config.get("max_position_embeddings", 2048))
        self.max_model_len = int(kwargs.get("max_model_len") or derived)
        if self.max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={derived} in model's config.json).")
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = str(model)
        self.engine_args = {"model": str(model), **kwargs}
        # where callers read the context length and model of a real engine
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            model=str(model), max_model_len=self.max_model_len, dtype=dtype))
        self._held = NODE.reserve(tp, float(kwargs.get("gpu_memory_utilization", 0.9)))
        weakref.finalize(self, NODE.release, self._held)

    def get_tokenizer(self):
        return self._tokenizer

    def _token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt))           # special tokens added, as vLLM does
        return list(prompt["prompt_token_ids"])

    def generate(self, prompts, sampling_params=None, use_tqdm=True, **kwargs) -> list[RequestOutput]:
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        ids = [self._token_ids(p) for p in prompts]
        for i in ids:
            if len(i) > self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(i)}) is longer than the maximum model "
                                 f"length of {self.max_model_len}. Make sure that `max_model_len` is no smaller "
                                 "than the number of text tokens.")
        return [self._one(str(k), p, i, sp) for k, (p, i, sp) in enumerate(zip(prompts, ids, params))]

    def _one(self, rid: str, prompt, ids: list[int], sp: SamplingParams) -> RequestOutput:
        tok = self._tokenizer
        text = answers.respond(tok.decode(ids), sp.seed or 0)
        if sp.structured_outputs is not None:
            text = answers.structured(text, sp.structured_outputs)
        out = list(tok.encode(text, add_special_tokens=False))
        limit = sp.max_tokens or len(out)
        finish = "length" if len(out) > limit else "stop"
        out = out[:limit]
        logprobs = None
        if sp.logprobs is not None:
            logprobs = [self._step(t, sp.logprobs, text) for t in out]
        return RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                             [CompletionOutput(0, tok.decode(out), out, -0.1 * len(out), logprobs, finish)])

    def _step(self, token: int, k: int, text: str) -> dict[int, Logprob]:
        """The sampled token (rank 1) and up to k alternatives; for a Yes/No answer the other word is
        the runner-up, as a model's first-token distribution would have it."""
        tok = self._tokenizer
        step = {token: Logprob(-0.05, 1, tok.decode([token]))}
        other = {"Yes": "No", "No": "Yes"}.get(text.strip())
        cands = ([tok.encode(other, add_special_tokens=False)[0]] if other else []) + list(range(3, 3 + k))
        for rank, t in enumerate((c for c in cands if c not in step), start=2):
            if len(step) > k:
                break
            step[t] = Logprob(-3.0 - rank, rank, tok.decode([t]))
        return step

    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template=None,
             add_generation_prompt=True, **kwargs) -> list[RequestOutput]:
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self._tokenizer
        prompts = [{"prompt_token_ids": tok.encode(
            tok.apply_chat_template(c, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                    tokenize=False), add_special_tokens=False)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "NODE"]
