"""HTTP backend: any OpenAI-compatible chat-completions server (e.g. `vllm serve <model>`).

POST {base_url}/chat/completions with the request's messages and seed; `batch_size` requests in
flight at once. What a failure does:

- HTTP 401/403 (bad or missing key), 404 (no such endpoint or model) and connection errors (refused,
  unresolvable host) raise :class:`LLMError` at once: every other request would fail the same way.
- HTTP 429, 5xx and timeouts are retried `retries` times with capped exponential backoff (429: the
  server's Retry-After, capped alike); when the retries run out, LLMError.
- Each attempt has a total deadline of `timeout` seconds (requests' own timeout is per socket read,
  so a server trickling a byte a second would hang it): when it passes, the socket is shut down.
- Anything else (HTTP 400, a body that is not JSON, `choices: []`, content that is not text, a
  refusal) concerns one request: it comes back as a ChatResult with `error` set, for the caller to
  count; a run with no usable answer fails there.

A request carrying a `schema` (a list request, see :meth:`ChatBackend.list_schema`) asks for it with
`response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}`, which
OpenAI and `vllm serve` enforce. A server that refuses it (HTTP 400/422 naming response_format or
json_schema) gets those requests again without it, once; the backend warns and sends none for the
rest of the run, and the answers are parsed as text lists (`structured: json_schema` makes the
refusal an LLMError instead).

No tokenizer here: `count_tokens` is the conservative estimate of :func:`pas.llm.base.estimate_tokens`;
the context length is `max_context_tokens`, else the `max_model_len` that `vllm serve` reports for the
model in GET {base_url}/models (plain OpenAI servers report none: nothing is budgeted then).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Sequence

from pas.llm.base import (YES_NO_TOP_LOGPROBS, ChatBackend, ChatRequest, ChatResult, LLMError, LLMSpec, YesNo,
                          error_verdict, yes_no_verdict)

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401: "not authorised (check api_key_env)", 403: "forbidden (check api_key_env)",
                404: "not found (check base_url and model)"}
MAX_BACKOFF = 60.0  # seconds: the longest wait before one retry
SCHEMA_NAME = "list"  # json_schema.name of a list request's response_format
SCHEMA_REFUSED = re.compile(r"response_format|json_schema|structured", re.IGNORECASE)


class RequestFailed(RuntimeError):
    """One request failed in a way that concerns only that request (`status`, `detail`: the HTTP
    status and full body of an HTTP failure)."""

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status, self.detail = status, detail


def refuses_schema(resp: Any) -> bool:
    """Whether a failed request was refused for its response_format (HTTP 400/422 naming it)."""
    return (isinstance(resp, RequestFailed) and resp.status in (400, 422)
            and bool(SCHEMA_REFUSED.search(resp.detail)))


def request_body(spec: LLMSpec, request: ChatRequest, yes_no: bool = False, structured: bool = True
                 ) -> dict[str, Any]:
    """The JSON body for one chat-completions call (pure). A request's `schema` becomes its
    response_format unless `structured` is False (a server that refused it)."""
    body: dict[str, Any] = {"model": spec.model, "messages": [dict(m) for m in request.messages],
                            "seed": int(request.seed), "n": 1}
    if yes_no:
        body.update(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=YES_NO_TOP_LOGPROBS)
        return body
    body.update(temperature=spec.temperature, top_p=spec.top_p,
                max_tokens=request.max_new_tokens or spec.max_new_tokens)
    if spec.repetition_penalty != 1.0:  # a vLLM extension; plain OpenAI servers don't know it
        body["repetition_penalty"] = spec.repetition_penalty
    if request.schema is not None and structured:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": SCHEMA_NAME, "schema": request.schema, "strict": True}}
    return body


def message_text(message: Any) -> str:
    """The text of an assistant message as the OpenAI format allows it: a string, null, or a list of
    content parts ({"type": "text", "text": ...}; a "refusal" part or field is a refusal). Raises
    RequestFailed for anything else (a number, a dict, parts of other types)."""
    if not isinstance(message, dict):
        raise RequestFailed(f"malformed response: message is {type(message).__name__}")
    content = message.get("content")
    refusal = message.get("refusal")
    if isinstance(content, str):
        text = content
    elif content is None:
        text = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                refusal = refusal or part["refusal"]
            else:
                raise RequestFailed(f"malformed response: content part {str(part)[:100]!r}")
        text = "".join(texts)
    else:
        raise RequestFailed(f"malformed response: content is {type(content).__name__} {str(content)[:100]!r}")
    if refusal and not text.strip():
        raise RequestFailed(f"refusal: {str(refusal)[:200]}")
    return text


def first_choice(resp: Any) -> tuple[dict, str]:
    """The first choice of an answer and its message's text; RequestFailed when the request failed
    (`resp` is its RequestFailed) or the answer is malformed."""
    if isinstance(resp, RequestFailed):
        raise resp
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RequestFailed(f"malformed response (no choices): {str(resp)[:200]}")
    return choices[0], message_text(choices[0].get("message"))


class _Deadline:
    """Shuts down the sockets of one HTTP attempt when its deadline passes (or on abort)."""

    local = threading.local()  # the attempt running in this thread, for the connection class below

    def __init__(self, seconds: float):
        self.lock = threading.Lock()
        self.socks: list = []
        self.expired = False
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True

    def add(self, sock) -> None:
        with self.lock:
            self.socks.append(sock)
            late = self.expired
        if late:
            _shutdown(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            socks = list(self.socks)
        for s in socks:
            _shutdown(s)

    def __enter__(self):
        _Deadline.local.current = self
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        _Deadline.local.current = None


def _shutdown(sock) -> None:
    try:  # shutdown (unlike close) wakes a recv blocked in another thread
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _session():
    """A requests session whose new connections report their socket to the current _Deadline."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection

    def watched(base):
        class Watched(base):
            def connect(self):
                super().connect()
                d = getattr(_Deadline.local, "current", None)
                if d is not None:
                    d.add(self.sock)
        return Watched

    conn_cls = {"http": watched(HTTPConnection), "https": watched(HTTPSConnection)}

    class Adapter(HTTPAdapter):
        def get_connection_with_tls_context(self, *a, **kw):
            pool = super().get_connection_with_tls_context(*a, **kw)
            pool.ConnectionCls = conn_cls["https" if pool.scheme == "https" else "http"]
            return pool

    s = requests.Session()
    s.mount("http://", Adapter())
    s.mount("https://", Adapter())
    return s


class OpenAIBackend(ChatBackend):
    constrained = True

    def __init__(self, spec: LLMSpec):
        super().__init__(spec)
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self.schema_refused = False  # the server refused response_format: none is sent any more
        self._active: set[_Deadline] = set()  # attempts in flight, cut short when the batch aborts
        self._lock = threading.Lock()

    def model_context_length(self) -> int | None:
        """`max_model_len` of this model in GET {base_url}/models (vLLM's ModelCard), once; None when
        the server does not say (or cannot be asked: the chat calls report that)."""
        if not hasattr(self, "_context"):
            self._context = None
            try:
                import requests

                r = requests.get(self.spec.base_url.rstrip("/") + "/models", headers=self._headers(),
                                 timeout=min(self.spec.timeout, 30.0))
                cards = r.json().get("data") if r.status_code == 200 else None
                for card in cards if isinstance(cards, list) else []:
                    n = card.get("max_model_len") if isinstance(card, dict) else None
                    if card.get("id") == self.spec.model and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                        self._context = n
            except (requests.RequestException, ValueError, AttributeError) as e:
                log.warning("%s: cannot read the context length from %s/models (%s); set max_context_tokens",
                            self.where, self.spec.base_url, e)
        return self._context

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise LLMError(f"{self.where}: environment variable {self.spec.api_key_env} (api_key_env) "
                               "is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _attempt(self, body: dict, headers: dict) -> tuple[int, str, dict]:
        """One POST within the total deadline → (status, body text, headers). Raises LLMError for
        connection errors, TimeoutError for a timeout or a passed deadline, RequestFailed otherwise."""
        import requests

        with _Deadline(self.spec.timeout) as deadline, _session() as s:
            with self._lock:
                self._active.add(deadline)
            try:
                r = s.post(self.url, json=body, headers=headers, timeout=(self.spec.timeout, self.spec.timeout))
                return r.status_code, r.text, dict(r.headers)
            except requests.RequestException as e:
                if deadline.expired:
                    raise TimeoutError(f"no complete answer within {self.spec.timeout:g} s") from None
                if isinstance(e, requests.Timeout):
                    raise TimeoutError(f"{type(e).__name__}: {e}") from None
                if isinstance(e, requests.ConnectionError):
                    raise LLMError(f"{self.where}: cannot reach {self.url}: {e}") from None
                raise RequestFailed(f"{type(e).__name__}: {e}") from None
            finally:
                with self._lock:
                    self._active.discard(deadline)

    def _post(self, body: dict, abort: threading.Event) -> dict:
        """One request with retries → the decoded JSON answer."""
        import json

        headers = self._headers()
        last, wait_s, transient = "", 0.0, True
        for attempt in range(self.spec.retries + 1):
            if attempt:
                log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", self.url, attempt,
                            self.spec.retries + 1, last, wait_s)
                abort.wait(wait_s)
            if abort.is_set():
                raise RequestFailed("aborted: another request failed for good")
            wait_s = min(self.spec.retry_backoff * 2 ** attempt, MAX_BACKOFF)
            try:
                status, text, hdrs = self._attempt(body, headers)
            except TimeoutError as e:
                last, transient = f"timeout: {e}", True
                continue
            if status == 200:
                try:
                    return json.loads(text)
                except ValueError:  # truncated or garbled: tried again, then one request's problem
                    last, transient = f"invalid JSON in response: {text[:200]!r}", False
                    continue
            transient = True
            last = f"HTTP {status}: {text[:200]}"
            if status in FATAL_STATUS:
                raise LLMError(f"{self.where}: {self.url}: {FATAL_STATUS[status]}: {last}")
            if status not in RETRY_STATUS:
                raise RequestFailed(last, status, text)
            retry_after = hdrs.get("Retry-After") or hdrs.get("retry-after")
            if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                wait_s = min(max(wait_s, float(retry_after)), MAX_BACKOFF)
        if not transient:
            raise RequestFailed(last)
        raise LLMError(f"{self.where}: {self.url}: gave up after {self.spec.retries + 1} attempts: {last}")

    def _map(self, bodies: list[dict]) -> list[dict | RequestFailed]:
        """Answers in order; the first LLMError stops the other requests (pending ones are dropped,
        running ones see the abort before their next attempt) and is raised."""
        abort = threading.Event()

        def call(body):
            try:
                return self._post(body, abort)
            except RequestFailed as e:
                return e
            except LLMError:
                abort.set()
                raise

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.spec.batch_size) as pool:
            futures = [pool.submit(call, b) for b in bodies]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception() is not None:
                    abort.set()
                    for g in futures:
                        g.cancel()
                    with self._lock:
                        for d in self._active:
                            d.expire()
                    raise f.exception()
            out = [f.result() for f in futures]
        log.debug("%s: %d requests in %.1f s", self.url, len(bodies), time.perf_counter() - t0)
        return out

    def _chat_responses(self, requests: Sequence[ChatRequest]) -> list[dict | RequestFailed]:
        """The answers to chat requests; those the server refused for their response_format are sent
        again without it (once), and no later request carries one."""
        bodies = [request_body(self.spec, r, structured=not self.schema_refused) for r in requests]
        resps = self._map(bodies)
        again = [i for i, (b, r) in enumerate(zip(bodies, resps)) if "response_format" in b and refuses_schema(r)]
        if again:
            if self.spec.structured == "json_schema":
                raise LLMError(f"{self.where}: {self.url} refuses response_format json_schema, which structured: "
                               f"json_schema requires ({resps[again[0]]}); auto falls back to text lists")
            if not self.schema_refused:
                log.warning("%s: %s refuses response_format json_schema (%s); asking for text lists for the "
                            "rest of the run (set structured: off to skip the attempt)", self.where, self.url,
                            resps[again[0]])
            self.schema_refused = True
            for i, r in zip(again, self._map([request_body(self.spec, requests[i], structured=False)
                                              for i in again])):
                resps[i] = r
        return resps

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        results = []
        for resp in self._chat_responses(requests):
            try:
                choice, text = first_choice(resp)
            except RequestFailed as e:
                results.append(ChatResult(text="", error=str(e)))
                continue
            usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
            n_tok = usage.get("completion_tokens")
            finish = choice.get("finish_reason")
            results.append(ChatResult(text=text.strip(), finish_reason=finish if isinstance(finish, str) else None,
                                      n_tokens=n_tok if isinstance(n_tok, int) else None))
        return results

    def yes_no(self, requests: Sequence[ChatRequest]) -> list[YesNo]:
        verdicts = []
        for resp in self._map([request_body(self.spec, r, yes_no=True) for r in requests]):
            try:
                choice, text = first_choice(resp)
                lp = choice.get("logprobs") or {}
                content = (lp.get("content") if isinstance(lp, dict) else None) or []
                first = content[0] if isinstance(content, list) and content else {}
                top = (first.get("top_logprobs") if isinstance(first, dict) else None) or []
                if not isinstance(top, list) or not all(isinstance(c, dict) for c in top):
                    raise RequestFailed(f"malformed top_logprobs: {str(top)[:200]}")
            except RequestFailed as e:
                verdicts.append(error_verdict(str(e)))
                continue
            verdicts.append(yes_no_verdict(((c.get("token", ""), c.get("logprob", float("-inf"))) for c in top),
                                           text))
        return verdicts
