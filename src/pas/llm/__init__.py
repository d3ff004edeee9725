"""Language-model backends behind one interface (for `concepts` L1–L3 and `generate` L4).

How to call it (e.g. for L4 captions)::

    from pas.llm import ChatRequest, make_backend
    from pas.llm.parse import parse_list

    llm = make_backend(params["llm"]["l4"])          # a spec dict from params.yaml, or an LLMSpec
    reqs = [ChatRequest(messages=[{"role": "user", "content": prompt}], seed=s, max_new_tokens=96)
            for prompt, s in zip(prompts, seeds)]
    results = llm.chat(reqs)                          # list[ChatResult], same order; .text, .error
    items = parse_list(results[0].text).items         # robust list parsing (numbered, bullets, commas)
    llm.close()

- spec keys (see :class:`pas.llm.base.LLMSpec`): backend (transformers | vllm | openai), model (a local
  folder from the `models` stage, or the served name for openai), temperature, top_p, max_new_tokens,
  repetition_penalty, batch_size, base_url, api_key_env, timeout, retries, device, dtype, structured, ...
- Lists as JSON: `ChatRequest(..., schema=llm.list_schema())` is constrained to {"items": [...]} where
  the backend can (vllm, openai; `structured` not off) and None elsewhere; read answers with
  `pas.llm.parse.parse_answer(text, request.schema)` (JSON items, else the text list; `.source`).
- Each request carries its own seed: same (messages, seed, spec) → same answer (vllm: per-request
  SamplingParams.seed; transformers: one torch.Generator per row; openai: the `seed` field).
- `llm.yes_no(requests)` → list[YesNo(p_yes, text, method)]: first-token log-probs where available.
- A request that fails for good comes back with `error` set and empty text (callers count these and
  fail a run that got no usable answer). A backend that cannot serve at all (bad key, server
  unreachable, 429/5xx/timeouts past their retries) raises `LLMError`, fatal for the stage.
- `yes_no` verdicts that answer neither yes nor no ("unclear"), or come from a malformed reply
  ("unusable") or a failed request ("error") have p_yes = NaN and `usable` False.
- Models load lazily on the first call; torch/vllm are imported only inside the backends.
- `backend: vllm` with PAS_ENGINE=ray runs each call as a `ray.data.llm` job (vLLM replicas on the
  cluster's GPUs; `pas.llm.ray_vllm_backend`).
"""

from __future__ import annotations

from typing import Any, Mapping

from pas.llm.base import (ChatBackend, ChatRequest, ChatResult, LLMError, LLMSection, LLMSpec, YesNo,
                          spec_from_dict)

__all__ = ["ChatBackend", "ChatRequest", "ChatResult", "LLMError", "LLMSection", "LLMSpec", "YesNo",
           "make_backend", "spec_from_dict"]


def make_backend(spec: Mapping[str, Any] | LLMSpec, where: str = "llm", engine: Any = None) -> ChatBackend:
    """Validate `spec` and return its backend (nothing is loaded until the first call).

    `backend: vllm` runs in-process on the local engine and through `ray.data.llm` under
    PAS_ENGINE=ray (`engine`: a `pas.engine.EngineConfig`, default from the environment)."""
    backend = _make(spec_from_dict(spec, where), engine)
    backend.where = where
    return backend


def _make(spec: LLMSpec, engine: Any) -> ChatBackend:
    if spec.backend == "transformers":
        from pas.llm.transformers_backend import TransformersBackend
        return TransformersBackend(spec)
    if spec.backend == "vllm":
        from pas.engine import EngineConfig

        engine = EngineConfig.from_env() if engine is None else engine
        if engine.engine == "ray":
            from pas.llm.ray_vllm_backend import RayVLLMBackend
            return RayVLLMBackend(spec, engine)
        from pas.llm.vllm_backend import VLLMBackend
        return VLLMBackend(spec)
    from pas.llm.openai_backend import OpenAIBackend
    return OpenAIBackend(spec)
