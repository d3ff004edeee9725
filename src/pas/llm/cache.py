"""LLM answers kept across (killed) runs: a stage that asks many requests (`captions`: one per L4
caption) saves each finished piece of answers as it comes (`ChatBackend.chat_stream`), and a rerun
asks only what is missing.

An answer is stored under a hash of what decides it: the request (messages, seed, max_new_tokens, schema) and
:func:`answer_fingerprint` (the spec without its transport knobs, and the model files' fingerprint).
Any change there is a miss. Failed requests (`ChatResult.error`) are never stored: a rerun asks them
again, so an outage does not outlive itself as template fallbacks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from pas.hashing import sha256_json
from pas.io.resume import RecordStore
from pas.llm.base import ChatRequest, ChatResult, LLMSpec

# spec keys that change how a request reaches the model, not what it answers; and `structured`,
# which decides per request: a constrained request carries its schema, which is in its key
TRANSPORT_KEYS = ("timeout", "retries", "retry_backoff", "api_key_env", "max_context_tokens", "structured")


def answer_fingerprint(spec: LLMSpec, model_fingerprint: str | None = None) -> str:
    """What an answer depends on besides its request."""
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in TRANSPORT_KEYS}
    return sha256_json({"spec": fields, "model": model_fingerprint}, ensure_ascii=True, default=str)


class AnswerCache:
    """`get(request)` → the stored ChatResult or None; `put(pairs)` stores the successful ones."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.store = RecordStore(root)
        self.fingerprint = fingerprint
        self.hits = 0

    def key(self, request: ChatRequest) -> str:
        return sha256_json([self.fingerprint, request.to_json()])

    def get(self, request: ChatRequest) -> ChatResult | None:
        rec = self.store.get(self.key(request))
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            return None
        self.hits += 1
        return ChatResult(text=rec["text"], finish_reason=rec.get("finish_reason"), n_tokens=rec.get("n_tokens"))

    def put(self, pairs: Iterable[tuple[ChatRequest, ChatResult]]) -> None:
        self.store.add({self.key(req): {"text": res.text, "finish_reason": res.finish_reason,
                                        "n_tokens": res.n_tokens}
                        for req, res in pairs if res.ok})

    def compact(self) -> int:
        """Drop answers this run did not ask for (older bank or params); returns how many."""
        return self.store.compact()
