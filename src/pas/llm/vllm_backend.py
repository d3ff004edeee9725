"""GPU backend: vLLM offline batch inference (`LLM.generate`), one `SamplingParams` per request so each
request carries its own seed. vLLM is CUDA-only and pins its own torch: it is imported lazily and
runs inside the `llm` container (`stages/run-in llm -- ...`). `model` is the folder the `models`
stage wrote (or any id vLLM accepts).

The prompt is the model's chat template rendered by vLLM's tokenizer and tokenised *without* adding
special tokens, passed as token ids: the template already starts with BOS, and a string prompt
would get a second one from `generate` (Llama-2, Mixtral).

A request carrying a `schema` (a list request) is decoded to it: `SamplingParams(structured_outputs=
StructuredOutputsParams(json=schema))`, the structured-outputs API of current vLLM (it replaced
`guided_decoding=GuidedDecodingParams(...)`, removed in 0.12).

One engine per process (:class:`pas.llm.base.EngineSlot`), keyed by :func:`engine_kwargs`: L1 and
L2 of the same model share it whatever their sampling settings; another model releases it first.
"""

from __future__ import annotations

from typing import Any, Sequence

from pas.llm.base import (YES_NO_TOP_LOGPROBS, ChatBackend, ChatRequest, ChatResult, EngineSlot, LLMSpec, Message,
                          YesNo, config_context_length, yes_no_verdict)


def engine_kwargs(spec: LLMSpec) -> dict[str, Any]:
    """Arguments of `vllm.LLM(...)` for a spec."""
    kw: dict[str, Any] = {"model": spec.model, "dtype": spec.dtype, "seed": 0,
                          "gpu_memory_utilization": spec.gpu_memory_utilization,
                          "tensor_parallel_size": spec.tensor_parallel_size}
    if spec.max_model_len is not None:
        kw["max_model_len"] = spec.max_model_len
    if spec.quantization is not None:
        kw["quantization"] = spec.quantization
    return kw


def engine_identity(spec: LLMSpec) -> tuple:
    """What a vLLM engine is built from: equal for specs that differ only in sampling settings."""
    return tuple(sorted(engine_kwargs(spec).items()))


ENGINE = EngineSlot()  # the process's vLLM engine


def chat_token_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The prompt token ids of a chat: the chat template rendered as text (it holds the BOS, if the
    model has one), tokenised *without* adding special tokens again. Both vLLM backends feed these
    to the engine as a token prompt, so nothing tokenises the string a second time."""
    text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def context_length(spec: LLMSpec) -> int | None:
    """The engine's context: `max_model_len` when set, else what vLLM derives from config.json."""
    return spec.max_model_len or config_context_length(spec.model)


def sampling_kwargs(spec: LLMSpec, request: ChatRequest, yes_no: bool = False) -> dict[str, Any]:
    """Arguments of `vllm.SamplingParams(...)` for one request (pure; unit-tested without vllm)."""
    if yes_no:  # one token, its top log-probs; the seed keeps the (unused) sample fixed too
        return {"n": 1, "temperature": 0.0, "max_tokens": 1, "logprobs": YES_NO_TOP_LOGPROBS,
                "seed": int(request.seed)}
    return {"n": 1, "temperature": spec.temperature, "top_p": spec.top_p,
            "repetition_penalty": spec.repetition_penalty,
            "max_tokens": request.max_new_tokens or spec.max_new_tokens, "seed": int(request.seed),
            "logprobs": 0}


def structured_outputs(request: ChatRequest, yes_no: bool = False) -> dict[str, Any] | None:
    """Arguments of `vllm.sampling_params.StructuredOutputsParams(...)` for one request: its schema
    as `json`, or None (no schema; yes/no questions are never constrained)."""
    return None if yes_no or request.schema is None else {"json": request.schema}


class VLLMBackend(ChatBackend):
    constrained = True

    def identity(self) -> tuple:
        return ("vllm", engine_identity(self.spec))

    def _load(self):
        def build():
            try:
                from vllm import LLM
            except ImportError as e:
                raise ImportError("backend vllm needs the `vllm` package (GPU; run the stage with "
                                  "`stages/run-in llm -- ...` or `bash scripts/install.sh --stack llm`)") from e
            return LLM(**engine_kwargs(self.spec))
        return ENGINE.get(engine_identity(self.spec), build)

    def prompts(self, requests: Sequence[ChatRequest]) -> list[dict]:
        """Token-id prompts (vLLM's TokensPrompt): the chat template's own BOS, no second one."""
        tok = self._load().get_tokenizer()
        return [{"prompt_token_ids": chat_token_ids(tok, r.messages)} for r in requests]

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(chat_token_ids(self._load().get_tokenizer(), messages))

    def model_context_length(self) -> int | None:
        return context_length(self.spec)

    def _generate(self, requests: Sequence[ChatRequest], yes_no: bool):
        if not requests:
            return []
        llm = self._load()
        from vllm import SamplingParams

        params = []
        for r in requests:
            kw, so = sampling_kwargs(self.spec, r, yes_no), structured_outputs(r, yes_no)
            if so is not None:
                from vllm.sampling_params import StructuredOutputsParams

                kw["structured_outputs"] = StructuredOutputsParams(**so)
            params.append(SamplingParams(**kw))
        return llm.generate(self.prompts(requests), sampling_params=params, use_tqdm=False)

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        results = []
        for out in self._generate(requests, yes_no=False):
            c = out.outputs[0]
            lps = None
            if c.logprobs:
                lps = [(step[t].decoded_token, step[t].logprob) for t, step in zip(c.token_ids, c.logprobs)
                       if t in step]
            results.append(ChatResult(text=c.text.strip(), logprobs=lps, finish_reason=c.finish_reason,
                                      n_tokens=len(c.token_ids)))
        return results

    def yes_no(self, requests: Sequence[ChatRequest]) -> list[YesNo]:
        verdicts = []
        for out in self._generate(requests, yes_no=True):
            c = out.outputs[0]
            first = c.logprobs[0].values() if c.logprobs else []
            verdicts.append(yes_no_verdict(((lp.decoded_token or "", lp.logprob) for lp in first), c.text))
        return verdicts

    def close(self) -> None:
        """Release this spec's engine and its GPU memory (best effort: del + gc + empty_cache)."""
        ENGINE.release(engine_identity(self.spec))
