"""CPU backend: a local transformers causal-LM folder (offline: SmolLM2-135M-Instruct from `models/llm/`).

Batched generation with left padding and the model's chat template. Sampling is seeded per request:
a logits processor draws each row's next token with that row's own ``torch.Generator`` (greedy
decoding then just takes the drawn token), so a request's answer follows from (messages, seed) and
not from the batch's shared RNG. Greedy answers of small models degenerate into repeated lines
(measured with SmolLM2: "1. Baklab" ×30), hence temperature/top_p/repetition penalty by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from pas.llm.base import (YES_NO_TOP_LOGPROBS, ChatBackend, ChatRequest, ChatResult, EngineSlot, Message, YesNo,
                          config_context_length, yes_no_verdict)

log = logging.getLogger(__name__)


class _RowSampler:
    """Logits processor that samples row i with generators[i] and returns a one-hot score row
    (0 at the drawn token, -inf elsewhere); records the drawn token's log-probability."""

    def __init__(self, generators, temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p
        self.logprobs: list[list[float]] = [[] for _ in generators]

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:  # keep the smallest set of top tokens whose mass reaches top_p
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) >= self.top_p  # mass before this token already ≥ p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        logp = scores.log_softmax(-1)
        out = torch.full_like(scores, float("-inf"))
        for i, gen in enumerate(self.generators):
            tok = torch.multinomial(logp[i].exp(), 1, generator=gen)
            out[i, tok] = 0.0
            self.logprobs[i].append(float(logp[i, tok]))
        return out


@dataclass
class _Loaded:
    tok: Any
    model: Any
    stop_ids: list[int]


MODEL = EngineSlot()  # the process's transformers model, shared by roles of the same identity


class TransformersBackend(ChatBackend):
    def identity(self) -> tuple:
        s = self.spec
        return ("transformers", s.model, s.dtype, s.device, s.threads)

    # -- loading -------------------------------------------------------------------------------
    def _load(self) -> _Loaded:
        return MODEL.get(self.identity(), self._build)

    @property
    def _tok(self):
        return self._load().tok

    def _build(self) -> _Loaded:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.spec.threads > 0 and self.spec.device == "cpu":
            torch.set_num_threads(self.spec.threads)
        dtype = "auto" if self.spec.dtype == "auto" else getattr(torch, self.spec.dtype)
        try:
            tok = AutoTokenizer.from_pretrained(self.spec.model, padding_side="left")
            model = AutoModelForCausalLM.from_pretrained(self.spec.model, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(f"LLM folder {self.spec.model!r} could not be loaded (run the `models` "
                                    f"stage first?): {e}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.to(self.spec.device).eval()
        stops = {tok.eos_token_id, tok.get_vocab().get("<|im_end|>")}
        return _Loaded(tok, model, sorted(s for s in stops if s is not None))

    def render(self, request: ChatRequest) -> str:
        """The prompt text the model sees (chat template + generation prompt)."""
        return self._tok.apply_chat_template(list(request.messages), add_generation_prompt=True,
                                             tokenize=False)

    def _batches(self, requests: Sequence[ChatRequest]):
        """Prompt token ids, then batches of request indices grouped by prompt length (fewer pads)."""
        ids = [self._tok(self.render(r), add_special_tokens=False)["input_ids"] for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (len(ids[i]), i))
        bs = self.spec.batch_size
        return ids, [order[k:k + bs] for k in range(0, len(order), bs)]

    def _pad(self, rows):
        import torch

        width = max(len(r) for r in rows)
        pad = self._tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return input_ids.to(self.spec.device), mask.to(self.spec.device)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self._tok(self.render(ChatRequest(tuple(messages))), add_special_tokens=False)["input_ids"])

    def model_context_length(self) -> int | None:
        return config_context_length(self.spec.model)

    # -- chat ----------------------------------------------------------------------------------
    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        for idx, res in self.chat_stream(requests):
            for i, r in zip(idx, res):
                results[i] = r
        return results  # type: ignore[return-value]

    def chat_stream(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[list[int], list[ChatResult]]]:
        """One piece per forward batch: the batches `chat` runs, so streaming changes no answer."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        if not requests:
            return
        ids, batches = self._batches(requests)
        for batch in batches:
            loaded = self._load()
            limits = [requests[i].max_new_tokens or self.spec.max_new_tokens for i in batch]
            input_ids, mask = self._pad([ids[i] for i in batch])
            procs = LogitsProcessorList()
            if self.spec.repetition_penalty != 1.0:
                procs.append(RepetitionPenaltyLogitsProcessor(self.spec.repetition_penalty))
            sampler = None
            if self.spec.temperature > 0:
                gens = [torch.Generator(device="cpu").manual_seed(int(requests[i].seed) % 2**63)
                        for i in batch]
                sampler = _RowSampler(gens, self.spec.temperature, self.spec.top_p)
                procs.append(sampler)
            cfg = GenerationConfig(max_new_tokens=max(limits), do_sample=False, num_beams=1,
                                   eos_token_id=loaded.stop_ids, pad_token_id=self._tok.pad_token_id)
            with torch.inference_mode():
                out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg,
                                            logits_processor=procs)
            new = out[:, input_ids.shape[1]:].tolist()
            results = []
            for row, i in enumerate(batch):
                toks = new[row][:limits[row]]
                finish = "length"
                for k, t in enumerate(toks):
                    if t in loaded.stop_ids:
                        toks, finish = toks[:k], "stop"
                        break
                lps = None
                if sampler is not None:
                    lps = [(self._tok.decode([t]), lp) for t, lp in zip(toks, sampler.logprobs[row])]
                results.append(ChatResult(text=self._tok.decode(toks, skip_special_tokens=True).strip(),
                                          logprobs=lps, finish_reason=finish, n_tokens=len(toks)))
            yield list(batch), results

    # -- yes/no --------------------------------------------------------------------------------
    def yes_no(self, requests: Sequence[ChatRequest]) -> list[YesNo]:
        """P(yes) from the next-token distribution right after the generation prompt (one forward)."""
        import torch

        if not requests:
            return []
        ids, batches = self._batches(requests)
        verdicts: list[YesNo | None] = [None] * len(requests)
        for batch in batches:
            loaded = self._load()
            input_ids, mask = self._pad([ids[i] for i in batch])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = loaded.model(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits
            logp = logits[:, -1, :].float().log_softmax(-1)
            top = logp.topk(YES_NO_TOP_LOGPROBS, dim=-1)
            for row, i in enumerate(batch):
                # distinct ids that decode alike add up
                cands = [(self._tok.decode([t]), lp)
                         for lp, t in zip(top.values[row].tolist(), top.indices[row].tolist())]
                verdicts[i] = yes_no_verdict(cands, self._tok.decode([top.indices[row, 0].item()]))
        return verdicts  # type: ignore[return-value]

    def close(self) -> None:
        MODEL.release(self.identity())
