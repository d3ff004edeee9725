"""HTTP backend: any OpenAI-compatible chat-completions server (e.g. `vllm serve <model>`).

POST {base_url}/chat/completions with the request's messages and seed; `batch_size` requests in
flight at once. Connection errors, timeouts, HTTP 429 and 5xx are retried `retries` times with
exponential backoff; a request that still fails comes back as a ChatResult with `error` set.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from pas.llm.base import ChatBackend, ChatRequest, ChatResult, LLMSpec, YesNo, yes_no_verdict

log = logging.getLogger(__name__)
YES_NO_TOP_LOGPROBS = 20
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestFailed(RuntimeError):
    pass


def request_body(spec: LLMSpec, request: ChatRequest, yes_no: bool = False) -> dict[str, Any]:
    """The JSON body for one chat-completions call (pure)."""
    body: dict[str, Any] = {"model": spec.model, "messages": [dict(m) for m in request.messages],
                            "seed": int(request.seed), "n": 1}
    if yes_no:
        body.update(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=YES_NO_TOP_LOGPROBS)
        return body
    body.update(temperature=spec.temperature, top_p=spec.top_p,
                max_tokens=request.max_new_tokens or spec.max_new_tokens)
    if spec.repetition_penalty != 1.0:  # a vLLM extension; plain OpenAI servers don't know it
        body["repetition_penalty"] = spec.repetition_penalty
    return body


class OpenAIBackend(ChatBackend):
    def __init__(self, spec: LLMSpec):
        super().__init__(spec)
        self.url = spec.base_url.rstrip("/") + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise RuntimeError(f"environment variable {self.spec.api_key_env} (llm api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, body: dict) -> dict:
        """One call with retries; raises RequestFailed after the last attempt."""
        import requests

        headers = self._headers()
        last = ""
        for attempt in range(self.spec.retries + 1):
            if attempt:
                time.sleep(self.spec.retry_backoff * 2 ** (attempt - 1))
            try:
                r = requests.post(self.url, json=body, headers=headers, timeout=self.spec.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {e}"
                log.warning("%s: attempt %d/%d failed: %s", self.url, attempt + 1, self.spec.retries + 1, last)
                continue
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    last = f"invalid JSON in response: {r.text[:200]!r}"
                    continue
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code not in RETRY_STATUS:
                break
            log.warning("%s: attempt %d/%d failed: %s", self.url, attempt + 1, self.spec.retries + 1, last)
        raise RequestFailed(last)

    def _map(self, bodies: list[dict]) -> list[dict | Exception]:
        def call(body):
            try:
                return self._post(body)
            except RequestFailed as e:
                return e
        with ThreadPoolExecutor(max_workers=self.spec.batch_size) as pool:
            return list(pool.map(call, bodies))

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        results = []
        for resp in self._map([request_body(self.spec, r) for r in requests]):
            if isinstance(resp, Exception):
                results.append(ChatResult(text="", error=str(resp)))
                continue
            try:
                choice = resp["choices"][0]
                text = choice["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                results.append(ChatResult(text="", error=f"malformed response: {str(resp)[:200]}"))
                continue
            usage = resp.get("usage") or {}
            results.append(ChatResult(text=text.strip(), finish_reason=choice.get("finish_reason"),
                                      n_tokens=usage.get("completion_tokens")))
        return results

    def yes_no(self, requests: Sequence[ChatRequest]) -> list[YesNo]:
        verdicts = []
        for resp in self._map([request_body(self.spec, r, yes_no=True) for r in requests]):
            if isinstance(resp, Exception):
                verdicts.append(YesNo(0.0, str(resp), "error"))  # a failed check never accepts
                continue
            choice = (resp.get("choices") or [{}])[0]
            text = ((choice.get("message") or {}).get("content")) or ""
            content = ((choice.get("logprobs") or {}).get("content")) or []
            first = (content[0].get("top_logprobs") or []) if content else []
            verdicts.append(yes_no_verdict(((c.get("token", ""), float(c.get("logprob", float("-inf"))))
                                            for c in first), text))
        return verdicts
