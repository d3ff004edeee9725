"""The openai backend against a real HTTP server on 127.0.0.1 speaking chat-completions."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pas.llm import ChatRequest, make_backend
from pas.llm.openai_backend import request_body
from pas.llm.base import LLMError, LLMSpec, spec_from_dict
from pas.llm.parse import list_schema, parse_answer
from pas.params import ParamsError


class Server:
    """Answers `answer(body)`; `plan` is a list of per-call behaviours consumed in order:
    an int = HTTP status to fail with, "sleep" = stall past the client timeout, "junk" = invalid JSON,
    "trickle" = a valid answer sent a byte every 50 ms (each read well inside the client's timeout),
    "trickle_headers" = the same from the status line on, bytes = this body with status 200,
    a dict = this JSON answer."""

    def __init__(self):
        self.bodies, self.headers, self.plan = [], [], []
        self.retry_after = None
        self.models = None   # GET /v1/models cards, as `vllm serve` lists them ({"id", "max_model_len"})
        self.refuse_schema = False  # HTTP 400 for a body with response_format, as a server without it says
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path != "/v1/models" or outer.models is None:
                    return self._send(404, b"{}")
                self._send(200, json.dumps({"object": "list", "data": outer.models}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    step = outer.plan.pop(0) if outer.plan else None
                if self.path != "/v1/chat/completions":
                    return self._send(404, b"{}")
                if outer.refuse_schema and "response_format" in body:
                    return self._send(400, json.dumps({"object": "error", "type": "BadRequestError", "code": 400,
                                                       "message": "Unsupported response_format type: json_schema"
                                                       }).encode())
                if step == "sleep":
                    time.sleep(1.0)
                    return self._send(200, json.dumps(outer.answer(body)).encode())
                if step == "junk":
                    return self._send(200, b"not json")
                if isinstance(step, bytes):
                    return self._send(200, step)
                if isinstance(step, dict):
                    return self._send(200, json.dumps(step).encode())
                if step in ("trickle", "trickle_headers"):
                    return self._trickle(json.dumps(outer.answer(body)).encode(), step == "trickle_headers")
                if isinstance(step, int):
                    return self._send(step, b'{"error": "planned"}', outer.retry_after)
                self._send(200, json.dumps(outer.answer(body)).encode())

            def _trickle(self, data, from_status_line):
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n").encode()
                slow = head + data if from_status_line else data
                try:
                    if not from_status_line:
                        self.wfile.write(head)
                        self.wfile.flush()
                    for k in range(len(slow)):
                        self.wfile.write(slow[k:k + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
                self.close_connection = True

            def _send(self, code, data, retry_after=None):
                try:
                    self.send_response(code)
                    if retry_after:
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def answer(body):
        last = body["messages"][-1]["content"]
        if body.get("logprobs"):
            top = ([{"token": "Yes", "logprob": -0.2231}, {"token": " no", "logprob": -1.6094}]
                   if "paella" in last else [{"token": "No", "logprob": -0.1}, {"token": "yes", "logprob": -2.4}])
            return {"choices": [{"message": {"role": "assistant", "content": top[0]["token"]},
                                 "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                                           "top_logprobs": top}]},
                                 "finish_reason": "length"}]}
        content = f"echo {last} seed={body['seed']}"
        if body.get("response_format", {}).get("type") == "json_schema":   # as constrained decoding writes it
            content = json.dumps({"items": [f"echo {last}", f"seed={body['seed']}"]})
        return {"choices": [{"message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def spec(server, **kw):
    base = dict(backend="openai", model="smol", base_url=server.url, retries=2, retry_backoff=0.01,
                timeout=5.0, batch_size=3)
    base.update(kw)
    return base


def req(text, seed=0, n=None):
    return ChatRequest(({"role": "user", "content": text},), seed=seed, max_new_tokens=n)


def test_chat_order_seed_and_body(server):
    llm = make_backend(spec(server, temperature=0.7, repetition_penalty=1.2))
    out = llm.chat([req(f"q{i}", seed=10 + i, n=5 if i == 0 else None) for i in range(7)])
    assert [r.text for r in out] == [f"echo q{i} seed={10 + i}" for i in range(7)]
    assert all(r.error is None and r.finish_reason == "stop" and r.n_tokens == 3 for r in out)
    b = next(b for b in server.bodies if b["messages"][0]["content"] == "q0")
    assert b["model"] == "smol" and b["max_tokens"] == 5 and b["temperature"] == 0.7
    assert b["repetition_penalty"] == 1.2 and b["seed"] == 10
    b1 = next(b for b in server.bodies if b["messages"][0]["content"] == "q1")
    assert b1["max_tokens"] == 256


def test_retry_fails_then_succeeds(server):
    server.plan = [503, 500]
    out = make_backend(spec(server)).chat([req("hello")])
    assert out[0].text == "echo hello seed=0" and out[0].error is None
    assert len(server.bodies) == 3


def test_transient_errors_past_their_retries_are_fatal(server):
    server.plan = [503, 503, 503, 503]
    with pytest.raises(LLMError, match=r"llm.l1: .*gave up after 3 attempts: HTTP 503"):
        make_backend(spec(server, retries=2), "llm.l1").chat([req("hello")])
    assert len(server.bodies) == 3


def test_429_waits_retry_after_then_succeeds(server):
    server.plan = [429]
    server.retry_after = "0.3"
    t0 = time.perf_counter()
    out = make_backend(spec(server, retry_backoff=0.0)).chat([req("hello")])
    assert out[0].text == "echo hello seed=0" and time.perf_counter() - t0 >= 0.3
    assert len(server.bodies) == 2


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_are_fatal_at_once(server, status):
    server.plan = [status] * 10
    llm = make_backend(spec(server, batch_size=1, retries=3), "llm.l3")
    with pytest.raises(LLMError, match=rf"llm.l3: .*HTTP {status}") as e:
        llm.chat([req(f"q{i}") for i in range(6)])
    assert "\n" not in str(e.value)
    assert len(server.bodies) == 1  # neither retried nor tried on the other requests


def test_client_error_concerns_one_request(server):
    server.plan = [400]
    out = make_backend(spec(server, batch_size=1)).chat([req("hello"), req("world")])
    assert "HTTP 400" in out[0].error and out[0].text == ""
    assert out[1].text == "echo world seed=0" and len(server.bodies) == 2


def test_timeout_then_success_and_invalid_json(server):
    server.plan = ["sleep", "junk"]
    t0 = time.perf_counter()
    out = make_backend(spec(server, timeout=0.3, retries=2)).chat([req("slow")])
    assert out[0].text == "echo slow seed=0"
    assert time.perf_counter() - t0 < 5
    assert len(server.bodies) == 3
    # garbage past the retries concerns that request only
    server.plan = ["junk", b'{"choices": [{"message": {"content": "trunc']
    out = make_backend(spec(server, retries=1, batch_size=1)).chat([req("a"), req("b")])
    assert "invalid JSON" in out[0].error and out[1].error is None and len(server.bodies) == 6


def test_timeout_gives_up(server):
    server.plan = ["sleep", "sleep"]
    with pytest.raises(LLMError, match="timeout"):
        make_backend(spec(server, timeout=0.2, retries=1)).chat([req("slow")])


@pytest.mark.parametrize("mode", ["trickle", "trickle_headers"])
def test_trickling_server_hits_the_total_deadline(server, mode):
    # every byte comes within 50 ms, far inside the 0.4 s per-read timeout; the answer takes > 5 s
    server.plan = [mode, mode]
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match="within 0.4 s"):
        make_backend(spec(server, timeout=0.4, retries=1)).chat([req("slow")])
    assert time.perf_counter() - t0 < 2.5
    server.plan = [mode]
    out = make_backend(spec(server, timeout=0.4, retries=1)).chat([req("then fast")])
    assert out[0].text == "echo then fast seed=0"


def test_connection_refused_is_fatal_at_once():
    llm = make_backend({"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "retries": 3,
                        "retry_backoff": 5.0, "timeout": 1.0}, "llm.l1")
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match="llm.l1: cannot reach http://127.0.0.1:9/v1/chat/completions"):
        llm.chat([req("x"), req("y")])
    assert time.perf_counter() - t0 < 2  # no 5 s backoff: not retried


def choice(message, **kw):
    return {"choices": [{"message": message, "finish_reason": "stop", **kw}]}


def test_content_as_the_openai_format_allows_it(server):
    server.plan = [
        choice({"content": [{"type": "text", "text": "1. Paella"}, {"type": "text", "text": "\n2. Ramen"}]}),
        choice({"content": None}),
        choice({"content": None, "refusal": "I can't help with that."}),
        choice({"content": [{"type": "refusal", "refusal": "No."}]}),
        choice({"content": 42}),
        choice({"content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
        {"choices": []},
        {"choices": [{"message": "hi"}]},
        {"error": "overloaded"},
        choice({"content": "caf\udc80 au lait"}),
    ]
    out = make_backend(spec(server, batch_size=1)).chat([req(f"q{i}") for i in range(10)])
    assert out[0].text == "1. Paella\n2. Ramen" and out[0].error is None
    assert out[1].text == "" and out[1].error is None          # empty: the caller counts it
    assert out[2].error == "refusal: I can't help with that." and out[3].error == "refusal: No."
    assert "content is int '42'" in out[4].error and "content part" in out[5].error
    assert all("malformed response" in r.error for r in out[6:9])
    assert out[9].text == "caf\ufffd au lait"                # a lone surrogate cannot reach UTF-8 files
    out[9].text.encode("utf-8")


def verdict_answer(top, content="Yes"):
    return {"choices": [{"message": {"content": content}, "logprobs": {"content": [{"top_logprobs": top}]}}]}


def test_yes_no_malformed_logprobs_are_unusable_not_no(server):
    import math

    server.plan = [
        verdict_answer([{"token": "Yes", "logprob": "high"}, {"token": "No", "logprob": -1.0}]),
        verdict_answer([{"token": "Yes", "logprob": float("nan")}]),
        verdict_answer([{"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": float("-inf")}]),
        {"choices": []},
        verdict_answer("lots"),
        verdict_answer([], content=[{"type": "text", "text": "No."}]),
    ]
    v = make_backend(spec(server, batch_size=1)).yes_no([req(f"q{i}") for i in range(6)])
    assert [x.method for x in v] == ["unusable", "unusable", "logprobs", "error", "error", "text"]
    assert math.isnan(v[0].p_yes) and math.isnan(v[1].p_yes) and not v[0].usable
    assert v[2].p_yes == 1.0 and v[5].p_yes == 0.0


def test_yes_no_uses_logprobs(server):
    llm = make_backend(spec(server))
    v = llm.yes_no([req("Is paella food?"), req("Is a car food?")])
    assert v[0].method == "logprobs" and v[0].p_yes == pytest.approx(0.8 / (0.8 + 0.2), abs=1e-3)
    assert v[1].p_yes == pytest.approx(0.0907 / (0.0907 + 0.9048), abs=1e-3)
    b = server.bodies[0]
    assert b["logprobs"] is True and b["max_tokens"] == 1 and b["top_logprobs"] == 20


def test_api_key_header(server, monkeypatch):
    monkeypatch.setenv("PAS_TEST_KEY", "sekrit")
    make_backend(spec(server, api_key_env="PAS_TEST_KEY")).chat([req("x")])
    assert server.headers[0]["Authorization"] == "Bearer sekrit"
    monkeypatch.delenv("PAS_TEST_KEY")
    with pytest.raises(LLMError, match="PAS_TEST_KEY"):
        make_backend(spec(server, api_key_env="PAS_TEST_KEY")).chat([req("x")])


def test_spec_validation_names_key():
    with pytest.raises(ParamsError, match="llm.l1.base_url"):
        make_backend({"backend": "openai", "model": "m"}, "llm.l1")
    with pytest.raises(ParamsError, match="llm.l2.temperatur"):
        make_backend({"temperatur": 0.5}, "llm.l2")
    with pytest.raises(ParamsError, match="backend"):
        make_backend({"backend": "llamacpp"})
    body = request_body(LLMSpec(backend="openai", model="m", base_url="http://x", repetition_penalty=1.0),
                        req("q", seed=3))
    assert "repetition_penalty" not in body and body["seed"] == 3


def test_context_length_from_the_server_and_estimated_tokens(server):
    """`vllm serve` reports max_model_len in GET /v1/models; a server that does not (plain OpenAI, or
    this stand-in before `models` is set) leaves it unknown unless max_context_tokens says it."""
    from pas.llm.base import estimate_tokens

    assert make_backend(spec(server)).context_length() is None            # 404: unknown
    server.models = [{"id": "other", "max_model_len": 2048}, {"id": "smol", "object": "model",
                                                               "max_model_len": 8192}]
    llm = make_backend(spec(server))
    assert llm.context_length() == 8192 and llm.context_length() == 8192
    assert make_backend(spec(server, max_context_tokens=1000)).context_length() == 1000
    assert make_backend(spec(server, model="nope")).context_length() is None
    msgs = ({"role": "user", "content": "1. Paella\n2. Sushi"},)
    assert llm.count_tokens(msgs) == estimate_tokens(msgs) == 64 + 8 + 9    # 18 bytes / 2


# --- structured output: response_format json_schema, text lists where a server refuses it ---------

def list_req(text, seed=0):
    return ChatRequest(({"role": "user", "content": text},), seed=seed, schema=list_schema(5))


def test_list_request_body_carries_the_schema(server):
    llm = make_backend(spec(server))
    assert llm.list_schema(5) == list_schema(5)
    assert make_backend(spec(server, structured="off")).list_schema() is None
    out = llm.chat([list_req("dishes", seed=4), req("plain")])
    by_text = {b["messages"][-1]["content"]: b for b in server.bodies}
    assert by_text["dishes"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "list", "schema": list_schema(5), "strict": True}}
    assert "response_format" not in by_text["plain"]
    assert parse_answer(out[0].text, list_schema(5)).items == ["echo dishes", "seed=4"]
    assert parse_answer(out[0].text, list_schema(5)).source == "json"
    assert "response_format" not in request_body(LLMSpec(**spec(server)), list_req("x"), yes_no=True)


def test_server_refusing_response_format_gets_text_requests_once_warned(server, caplog):
    server.refuse_schema = True
    llm = make_backend(spec(server, retries=0))
    with caplog.at_level("WARNING", logger="pas.llm.openai_backend"):
        first = llm.chat([list_req("a", 1), list_req("b", 2), list_req("c", 3)])
        second = llm.chat([list_req("d", 4)])
    assert [r.text for r in first] == ["echo a seed=1", "echo b seed=2", "echo c seed=3"]
    assert all(r.ok for r in first + second)
    # 3 refused, 3 asked again without it; then no more response_format for the rest of the run
    with_format = [b for b in server.bodies if "response_format" in b]
    assert len(with_format) == 3 and len(server.bodies) == 7
    assert "response_format" not in server.bodies[-1] and llm.schema_refused
    warned = [r for r in caplog.records if "refuses response_format" in r.getMessage()]
    assert len(warned) == 1
    parsed = parse_answer(first[0].text, list_schema(5))
    assert parsed.source == "text" and parsed.items == ["echo a seed=1"]


def test_required_json_schema_refused_is_fatal(server):
    server.refuse_schema = True
    llm = make_backend(spec(server, retries=0, structured="json_schema"), "llm.l1")
    with pytest.raises(LLMError, match=r"llm\.l1: .* refuses response_format json_schema, which structured"):
        llm.chat([list_req("a")])


def test_other_400s_are_not_read_as_a_refused_schema(server):
    server.plan = [400]
    llm = make_backend(spec(server, batch_size=1))
    out = llm.chat([list_req("a")])
    assert out[0].error and "HTTP 400" in out[0].error and not llm.schema_refused
    assert len(server.bodies) == 1


def test_structured_is_validated():
    with pytest.raises(ParamsError, match=r"llm\.l1\.structured"):
        spec_from_dict({"backend": "openai", "model": "m", "base_url": "http://x", "structured": "yes"}, "llm.l1")
    with pytest.raises(ParamsError, match="json_schema needs constrained decoding"):
        spec_from_dict({"backend": "transformers", "structured": "json_schema"}, "llm.l4")
    assert spec_from_dict({"backend": "vllm", "structured": "json_schema"}).structured == "json_schema"
    assert make_backend({"backend": "transformers", "structured": "auto"}).list_schema() is None
