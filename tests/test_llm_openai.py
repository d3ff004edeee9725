"""The openai backend against a real HTTP server on 127.0.0.1 speaking chat-completions."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pas.llm import ChatRequest, make_backend
from pas.llm.openai_backend import request_body
from pas.llm.base import LLMSpec
from pas.params import ParamsError


class Server:
    """Answers `answer(body)`; `plan` is a list of per-call behaviours consumed in order:
    an int = HTTP status to fail with, "sleep" = stall past the client timeout, "junk" = invalid JSON."""

    def __init__(self):
        self.bodies, self.headers, self.plan = [], [], []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    step = outer.plan.pop(0) if outer.plan else None
                if self.path != "/v1/chat/completions":
                    return self._send(404, b"{}")
                if step == "sleep":
                    time.sleep(1.0)
                    return self._send(200, json.dumps(outer.answer(body)).encode())
                if step == "junk":
                    return self._send(200, b"not json")
                if isinstance(step, int):
                    return self._send(step, b'{"error": "planned"}')
                self._send(200, json.dumps(outer.answer(body)).encode())

            def _send(self, code, data):
                try:
                    self.send_response(code)
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
        return {"choices": [{"message": {"role": "assistant", "content": f"echo {last} seed={body['seed']}"},
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


def test_gives_up_after_retries_without_raising(server):
    server.plan = [503, 503, 503, 503]
    out = make_backend(spec(server, retries=2)).chat([req("hello")])
    assert out[0].text == "" and "HTTP 503" in out[0].error
    assert len(server.bodies) == 3


def test_client_error_is_not_retried(server):
    server.plan = [400]
    out = make_backend(spec(server)).chat([req("hello")])
    assert "HTTP 400" in out[0].error and len(server.bodies) == 1


def test_timeout_then_success_and_invalid_json(server):
    server.plan = ["sleep", "junk"]
    t0 = time.perf_counter()
    out = make_backend(spec(server, timeout=0.3, retries=2)).chat([req("slow")])
    assert out[0].text == "echo slow seed=0"
    assert time.perf_counter() - t0 < 5
    assert len(server.bodies) == 3


def test_timeout_gives_up(server):
    server.plan = ["sleep", "sleep"]
    out = make_backend(spec(server, timeout=0.2, retries=1)).chat([req("slow")])
    assert "Timeout" in out[0].error


def test_connection_refused_is_an_error_result():
    llm = make_backend({"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "retries": 1,
                        "retry_backoff": 0.0, "timeout": 1.0})
    out = llm.chat([req("x")])
    assert out[0].error and "ConnectionError" in out[0].error


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
    with pytest.raises(RuntimeError, match="PAS_TEST_KEY"):
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
