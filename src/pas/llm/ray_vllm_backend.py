"""`backend: vllm` under PAS_ENGINE=ray: the requests of a call become a Ray Dataset run through
`ray.data.llm` (chat template → tokenize → vLLM engine actors → detokenize), so L1–L4 scale over the
GPUs of a Ray cluster as data-parallel vLLM replicas (tensor_parallel_size GPUs each).

Same contract as :class:`pas.llm.vllm_backend.VLLMBackend`: one answer per request, in request order;
per-request `SamplingParams` (built by the same `sampling_kwargs`, so each request keeps its own seed);
yes/no from the first token's top log-probs; a request vLLM fails on comes back with `error` set
(`should_continue_on_error`) instead of failing the batch.

A request's `schema` (a list request) travels as a JSON string (Arrow keeps it whole) and reaches
the engine as `sampling_params["structured_outputs"] = {"json": schema}`, which Ray (≥ 2.60) turns
into vLLM's `StructuredOutputsParams`.

Prompts go to the engine as token ids (`chat_token_ids`, in the preprocess step): Ray's own chat
template + tokenize stages are off, because its tokenize stage encodes the rendered template *with*
special tokens, a second BOS for Llama-2 / Mixtral. Ray (≥ 2.60) hands a failed row back without
running the postprocess, and a block that mixes both kinds of rows has every column of either, the
missing ones None: a row is read as failed by its `__inference_error__` alone.

Each `chat` / `yes_no` call is one Ray Data job and starts its engine actors afresh: right for the one
big batch of L4 captions, a model load per round for the iterative concept discovery (L1–L3). With a
handful of rounds and minutes-long batches that is the price of a stateless batch engine; a long-lived
`vllm serve` behind `backend: openai` avoids it.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any, Iterator, Sequence

from pas.llm.base import (ChatBackend, ChatRequest, ChatResult, LLMSpec, Message, YesNo, error_verdict,
                          yes_no_verdict)
from pas.llm.vllm_backend import chat_token_ids, context_length, engine_kwargs, sampling_kwargs, structured_outputs


@functools.lru_cache(maxsize=4)
def tokenizer(model: str) -> Any:
    """The model folder's tokenizer, once per process (the driver, each Ray worker)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def replicas(spec: LLMSpec, actors: int, resources: dict) -> int:
    """vLLM replicas: PAS_RAY_ACTORS, else as many as the cluster's GPUs hold (tensor_parallel_size
    GPUs each), at least one."""
    if actors:
        return actors
    return max(1, int(resources.get("GPU", 0) // spec.tensor_parallel_size))


def processor_config_kwargs(spec: LLMSpec, concurrency: int) -> dict[str, Any]:
    """Arguments of `ray.data.llm.vLLMEngineProcessorConfig` for a spec (pure; unit-tested)."""
    ek = engine_kwargs(spec)
    return {"model_source": ek.pop("model"), "engine_kwargs": ek, "batch_size": spec.batch_size,
            "concurrency": concurrency, "should_continue_on_error": True,
            "chat_template_stage": False, "tokenize_stage": False}   # the preprocess gives token ids


def _preprocess(row: dict, spec: LLMSpec, yes_no: bool) -> dict:
    req = ChatRequest(messages=tuple(dict(m) for m in row["messages"]), seed=int(row["seed"]),
                      max_new_tokens=int(row["max_new_tokens"]) or None,
                      schema=json.loads(row["schema"]) if row.get("schema") else None)
    sp = sampling_kwargs(spec, req, yes_no)
    so = structured_outputs(req, yes_no)
    if so is not None:
        sp["structured_outputs"] = {"json": json.dumps(so["json"], sort_keys=True)}
    return {"i": row["i"], "tokenized_prompt": chat_token_ids(tokenizer(spec.model), req.messages),
            "sampling_params": sp}


def _candidates(step: Any) -> list[tuple[int, str, float]]:
    """(token id, text, log-prob) of one generated position (`{token_id: {decoded_token, logprob}}`)."""
    return [(int(tid), str(info.get("decoded_token") or ""), float(info["logprob"]))
            for tid, info in dict(step or {}).items() if info is not None]


def _postprocess(row: dict, yes_no: bool) -> dict:
    """Plain columns only (the log-prob dicts, keyed by token id, do not survive Arrow blocks)."""
    err = row.get("__inference_error__") or ""
    lps: list = []
    steps = row.get("logprobs")
    if steps is not None and not err:
        if yes_no:
            lps = [[t, lp] for _, t, lp in _candidates(steps[0])] if len(steps) else []
        else:
            for tid, step in zip(row.get("generated_tokens") or [], steps):
                lps += [[t, lp] for i, t, lp in _candidates(step) if i == int(tid)]
    return {"i": int(row["i"]), "text": str(row.get("generated_text") or "").strip(),
            "n_tokens": int(row.get("num_generated_tokens") or 0), "logprobs": lps,
            "has_logprobs": steps is not None, "error": str(err)}


def _result_row(o: dict) -> dict:
    """An output row in `_postprocess`'s shape. With should_continue_on_error, Ray (≥ 2.60) hands a
    failed row back without running postprocess: the processor's own columns plus a non-empty
    `__inference_error__`; in a block with successful rows ours are there too, as None."""
    err = str(o.get("__inference_error__") or "")
    if not err and o.get("has_logprobs") is not None:
        return o
    err = err or f"ray.data.llm row without output: {sorted(k for k, v in o.items() if v is not None)[:8]}"
    return {"i": int(o["i"]), "text": "", "n_tokens": 0, "logprobs": [], "has_logprobs": False, "error": err}


class RayVLLMBackend(ChatBackend):
    constrained = True

    def __init__(self, spec: LLMSpec, engine=None):
        super().__init__(spec)
        from pas.engine import EngineConfig

        self.engine = EngineConfig.from_env() if engine is None else engine

    def _rows(self, requests: Sequence[ChatRequest], yes_no: bool) -> Iterator[dict]:
        """Output rows (`_postprocess`'s shape) in the order Ray finishes them; checks that every
        request came back."""
        if not requests:
            return
        import ray
        from ray.data import llm as ray_llm

        from pas.engine import ensure_ray

        ensure_ray(self.engine.ray_address)
        n = replicas(self.spec, self.engine.actors, ray.cluster_resources())
        config = ray_llm.vLLMEngineProcessorConfig(**processor_config_kwargs(self.spec, n))
        processor = ray_llm.build_processor(
            config, preprocess=functools.partial(_preprocess, spec=self.spec, yes_no=yes_no),
            postprocess=functools.partial(_postprocess, yes_no=yes_no))
        rows = [{"i": i, "messages": [dict(m) for m in r.messages], "seed": int(r.seed),
                 "max_new_tokens": int(r.max_new_tokens or 0),
                 "schema": "" if r.schema is None else json.dumps(r.schema, sort_keys=True)}
                for i, r in enumerate(requests)]
        seen: set[int] = set()
        for o in processor(ray.data.from_items(rows)).iter_rows():
            row = _result_row(o)
            seen.add(int(row["i"]))
            yield row
        missing = [i for i in range(len(rows)) if i not in seen]
        if missing:
            raise RuntimeError(f"ray.data.llm returned no row for requests {missing[:5]}")

    def _run(self, requests: Sequence[ChatRequest], yes_no: bool) -> list[dict]:
        by_i = {int(o["i"]): o for o in self._rows(requests, yes_no)}
        return [by_i[i] for i in range(len(requests))]

    @staticmethod
    def _chat_result(o: dict) -> ChatResult:
        if o["error"]:
            return ChatResult(text="", error=o["error"])
        lps = [(str(t), float(lp)) for t, lp in o["logprobs"]] if o["has_logprobs"] else None
        return ChatResult(text=o["text"], logprobs=lps, n_tokens=int(o["n_tokens"]))

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        return [self._chat_result(o) for o in self._run(requests, yes_no=False)]

    def chat_stream(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[list[int], list[ChatResult]]]:
        """One Ray Data job (one engine start) for all requests; pieces of `stream_waves * batch_size`
        rows as Ray streams them out."""
        rows = self._rows(requests, yes_no=False)
        while piece := list(itertools.islice(rows, max(1, self.stream_waves * self.spec.batch_size))):
            yield [int(o["i"]) for o in piece], [self._chat_result(o) for o in piece]

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(chat_token_ids(tokenizer(self.spec.model), messages))

    def model_context_length(self) -> int | None:
        return context_length(self.spec)

    def yes_no(self, requests: Sequence[ChatRequest]) -> list[YesNo]:
        return [error_verdict(o["error"]) if o["error"]
                else yes_no_verdict(((str(t), lp) for t, lp in o["logprobs"]), o["text"])
                for o in self._run(requests, yes_no=True)]
