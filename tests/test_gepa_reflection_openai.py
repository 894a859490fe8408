"""The OpenAI-compatible reflection client (openai SDK) against a real HTTP server on 127.0.0.1 (started here,
ephemeral port).

The server speaks chat-completions and, on a per-request script, answers 429, 500, 401, slow responses, and
malformed JSON. We check retries, timeouts and errors behave as documented in fst_jax/gepa/reflection.py, and
that the API key never shows in logs (caplog), exception text, tracebacks, repr or to_dict.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fst_jax.gepa.engine import GEPAConfig, GEPAEngine
from fst_jax.gepa.reflection import (
    CallableReflectionLM,
    Completion,
    LocalReflectionLM,
    OpenAIReflectionLM,
    ReflectionLMError,
    make_reflection_lm,
    register_reflection_lm,
)
from gepa_helpers import ScriptedEvaluate, reflect_reply

KEY = "sk-test-SECRET-0123456789abcdef"
ENV = "FST_TEST_REFLECTION_KEY"


class ChatServer:
    """A chat-completions endpoint; `script` holds one behaviour per upcoming request (then "ok")."""

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:  # header names lower-cased: HTTP clients differ in their spelling
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    server.requests.append({"path": self.path, "headers": headers, "body": body})
                    behaviour = server.script.pop(0) if server.script else ("ok",)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.respond(behaviour, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def respond(self, behaviour, body):
                kind = behaviour[0]
                if kind == "slow":
                    time.sleep(behaviour[1])
                    kind, behaviour = "ok", ("ok",)
                if kind == "reflect":  # a scripted reflection, served over HTTP
                    kind, behaviour = "ok", ("ok", reflect_reply(body["messages"][0]["content"]))
                if kind == "ok":
                    content = behaviour[1] if len(behaviour) > 1 else "echo: " + body["messages"][0]["content"]
                    finish = behaviour[2] if len(behaviour) > 2 else "stop"
                    self.send(200, json.dumps({"object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}))
                elif kind == "malformed":
                    self.send(200, '{"choices": [ {"message": ')
                elif kind == "status":
                    code, headers = behaviour[1], behaviour[2] if len(behaviour) > 2 else {}
                    # A badly behaved server that echoes the credentials it was sent.
                    self.send(code, json.dumps({"error": "nope", "auth": self.headers.get("authorization")}), headers)

            def send(self, code, text, headers=None):
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # don't wait for deliberately slow handlers at teardown
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


def client(server, **kw):
    defaults = dict(base_url=server.url, model="reflector", api_key_env=ENV, timeout_s=2.0, retries=2,
                    max_concurrency=4, temperature=0.7, max_tokens=321)
    return OpenAIReflectionLM(**{**defaults, **kw})


def assert_no_key(caplog, *texts):
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage()
    for t in texts:
        assert KEY not in t


def test_completes_in_order_with_protocol_fields(server, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    lm = client(server)
    prompts = [f"prompt {i}" for i in range(7)]
    replies = lm.complete(prompts)
    assert replies == [f"echo: prompt {i}" for i in range(7)]
    assert all(isinstance(r, Completion) and r.finished for r in replies)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    assert req["body"]["model"] == "reflector" and req["body"]["temperature"] == 0.7
    assert req["body"]["max_tokens"] == 321 and req["body"]["messages"][0]["role"] == "user"
    assert_no_key(caplog, repr(lm), json.dumps(lm.to_dict()), str(vars(lm)))
    assert lm.complete([]) == []


def test_length_finish_reason_marks_truncation(server, key_env):
    server.script = [("ok", "```\nhalf", "length")]
    (reply,) = client(server).complete(["p"])
    assert reply == "```\nhalf" and reply.finished is False


def test_retries_on_429_and_500_then_succeeds_with_backoff(server, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    server.script = [("status", 429), ("status", 500)]
    start = time.monotonic()
    assert client(server, max_concurrency=1).complete(["p"]) == ["echo: p"]
    assert len(server.requests) == 3
    assert time.monotonic() - start >= 0.375 + 0.75  # exponential back-off: 0.5 s, then 1 s, less ≤ 25% jitter
    assert any("Retrying request" in r.getMessage() for r in caplog.records)
    assert_no_key(caplog)


def test_retry_after_header_overrides_backoff(server, key_env):
    server.script = [("status", 429, {"Retry-After": "1.5"})]
    start = time.monotonic()
    assert client(server).complete(["p"]) == ["echo: p"]
    assert 1.5 <= time.monotonic() - start < 5  # the server's 1.5 s, not the 0.5 s first back-off


def test_persistent_5xx_raises_after_all_retries(server, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    server.script = [("status", 503)] * 3
    with pytest.raises(ReflectionLMError) as info:
        client(server, retries=2).complete(["p"])
    assert "HTTP 503" in str(info.value) and "after 3 attempts" in str(info.value)
    assert len(server.requests) == 3
    assert_no_key(caplog, str(info.value), repr(info.value), "".join(traceback.format_exception(info.value)))


def test_client_errors_fail_at_once_without_leaking_the_key(server, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    server.script = [("status", 401)]
    with pytest.raises(ReflectionLMError) as info:
        client(server).complete(["p"])
    assert "HTTP 401" in str(info.value) and "***" in str(info.value)  # echoed key replaced
    assert len(server.requests) == 1
    assert_no_key(caplog, str(info.value), "".join(traceback.format_exception(info.value)))


def test_slow_response_times_out_and_is_retried(server, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    server.script = [("slow", 4.0)]
    start = time.monotonic()
    assert client(server, timeout_s=0.3).complete(["p"]) == ["echo: p"]
    assert time.monotonic() - start < 3.0  # did not wait for the slow answer
    assert len(server.requests) == 2
    assert any("timeout" in r.getMessage().lower() for r in caplog.records)


def test_always_slow_raises_timeout_error(server, key_env):
    server.script = [("slow", 0.6)] * 2
    with pytest.raises(ReflectionLMError, match="after 2 attempts: the request timed out"):
        client(server, timeout_s=0.15, retries=1).complete(["p"])


def test_malformed_json_is_retried_then_reported(server, key_env):
    server.script = [("malformed",)]
    assert client(server).complete(["p"]) == ["echo: p"]
    server.script = [("malformed",)] * 3
    with pytest.raises(ReflectionLMError, match="malformed JSON"):
        client(server, retries=2).complete(["p"])


def test_connection_refused_is_retried_then_reported(key_env):
    s = ChatServer()
    url = s.url
    s.close()
    with pytest.raises(ReflectionLMError, match="after 2 attempts: cannot connect"):
        OpenAIReflectionLM(url, "m", api_key_env=ENV, retries=1, timeout_s=1).complete(["p"])


def test_concurrency_is_bounded(server, key_env):
    server.script = [("slow", 0.15)] * 9
    assert len(client(server, max_concurrency=3).complete([f"p{i}" for i in range(9)])) == 9
    assert 2 <= server.max_in_flight <= 3


def test_missing_key_variable_is_named_and_no_key_means_no_header(server, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ReflectionLMError, match=f"environment variable {ENV} is not set"):
        client(server).complete(["p"])
    for no_key in (None, ""):  # config.gepa.reflection.api_key_env="" means an endpoint without auth
        assert client(server, api_key_env=no_key).complete(["p"]) == ["echo: p"]
        assert "authorization" not in server.requests[-1]["headers"]
    with pytest.raises(ValueError, match="http"):
        OpenAIReflectionLM("localhost:8000", "m")


def test_engine_reflects_through_the_endpoint(server, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    server.script = [("reflect",)] * 100
    events = []
    engine = GEPAEngine(ScriptedEvaluate(), client(server), list(range(10)), list(range(100, 108)),
                        GEPAConfig(max_iterations=6, proposals_per_iteration=2), on_event=events.append)
    result = engine.run(engine.init_state({"p": "Solve it."}))
    iterations = [e for e in events if e["type"] == "iteration"]
    assert len(server.requests) == sum(1 for e in events if e["type"] == "proposal" and e["status"] != "skipped")
    assert sum(e["reflection_calls"] for e in iterations) <= 6  # one batched complete() per iteration
    assert len(result.candidates) > 1 and "+" in result.candidates[1]["p"]  # a reflected text was adopted
    assert_no_key(caplog, json.dumps(result.state.to_dict()), json.dumps(events))


def test_preflight_fails_fast_with_one_clear_line(server, key_env):
    client(server).preflight()
    assert server.requests[-1]["body"]["max_tokens"] == 1
    server.script = [("status", 401)]
    with pytest.raises(ReflectionLMError, match="HTTP 401") as info:
        client(server).preflight()
    assert "\n" not in str(info.value) and KEY not in str(info.value)
    server.script = [("status", 404)]
    with pytest.raises(ReflectionLMError, match="HTTP 404"):
        client(server).preflight()
    dead = ChatServer()
    dead.close()
    start = time.monotonic()
    with pytest.raises(ReflectionLMError, match="cannot connect"):
        client(dead, retries=5).preflight()
    assert time.monotonic() - start < 5  # one retry at start-up, not the run's five


def test_local_adapter_marks_unfinished_and_applies_template():
    seen = {}

    def generate_text(prompts, *, temperature, max_new_tokens):
        seen.update(prompts=prompts, temperature=temperature, max_new_tokens=max_new_tokens)
        return [(f"out {p}", i % 2 == 0) for i, p in enumerate(prompts)]

    lm = LocalReflectionLM(generate_text, temperature=0.3, max_new_tokens=77, format_prompt=lambda p: f"<u>{p}</u>")
    replies = lm.complete(["a", "b"])
    assert replies == ["out <u>a</u>", "out <u>b</u>"] and [r.finished for r in replies] == [True, False]
    assert seen == {"prompts": ["<u>a</u>", "<u>b</u>"], "temperature": 0.3, "max_new_tokens": 77}
    with pytest.raises(ReflectionLMError, match="1 outputs for 2 prompts"):
        LocalReflectionLM(lambda p, **kw: [("x", True)]).complete(["a", "b"])


def test_registry():
    lm = make_reflection_lm("callable", fn=lambda prompts: [p.upper() for p in prompts])
    assert isinstance(lm, CallableReflectionLM) and lm.complete(["ab"]) == ["AB"]
    assert isinstance(make_reflection_lm("openai", base_url="http://127.0.0.1:1/v1", model="m"), OpenAIReflectionLM)
    register_reflection_lm("constant", lambda text: CallableReflectionLM(lambda ps: [text] * len(ps)))
    assert make_reflection_lm("constant", text="z").complete(["a", "b"]) == ["z", "z"]
    with pytest.raises(ValueError, match="unknown reflection LM kind 'nope'"):
        make_reflection_lm("nope")
