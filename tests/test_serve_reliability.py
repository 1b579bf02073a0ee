"""The server under faults, floods and hostile requests: the server items of the reliability
checklist (docs/reliability.md maps each item to its test here or in test_serve.py).

Each test runs a real uvicorn server on loopback (tests/serve_helpers.py) with the tiny model.
Faults are injected by replacing one method of that server's own engine or scheduler. Every
wait has a bound, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import httpx
from helpers import tiny_config, write_tiny_gguf
from serve_helpers import (
    AUTH,
    JSON,
    KEY,
    LiveServer,
    chat,
    error_of,
    free_port,
    metric,
    serving_qwen,
    wait_idle,
)

from qwenlm.generation.scheduler import EngineFailed, Request, Scheduler
from qwenlm.serve import ServeConfig, serve
from qwenlm.serve.http import Guard, host_name

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server():
    with LiveServer(serving_qwen(), ServeConfig(api_key=KEY, max_body_bytes=8 * MiB)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def roomy():
    """No key, and a context with room for generations that outlast their clients."""
    with LiveServer(serving_qwen(max_position_embeddings=8192), ServeConfig(max_queue=256)) as s:
        yield s


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; the reply (b"" if the server cut the connection)."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):  # the server may answer and close before the end
            s.sendall(data)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                reply += chunk
                head, sep, body = reply.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if sep and (length is None or len(body) >= int(length.group(1))):
                    break
    return reply


# -- 1. the engine cannot die silently (checklist 9) -----------------------------------------
def test_a_failed_admission_fails_only_that_request(server, client, monkeypatch):
    cache = server.service.scheduler.prefix_cache
    real, calls = cache.take, []

    def take(prompt, *args):
        calls.append(prompt)
        if len(calls) == 1:
            raise RuntimeError("no memory for the cache")
        return real(prompt, *args)

    monkeypatch.setattr(cache, "take", take)
    e = error_of(client.post("/v1/chat/completions", json=chat(max_tokens=2)), 500)
    assert e["code"] == "engine_error" and e["type"] == "server_error"
    assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
    assert client.get("/health").json()["status"] == "ok"
    assert metric(client, "qwenlm_engine_errors_total") >= 1


def test_a_dead_engine_answers_503_on_health_and_every_inference_route(monkeypatch, caplog):
    def broken() -> None:
        raise RuntimeError("reaping broke\r\nFAKE log line")

    caplog.set_level(logging.ERROR, logger="qwenlm")
    with LiveServer(serving_qwen()) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        monkeypatch.setattr(s.service.scheduler, "_reap", broken)
        # The request in flight when the loop died gets an error, not a hang.
        error_of(c.post("/v1/chat/completions", json=chat(max_tokens=2)), 500)
        h = c.get("/health")
        assert h.status_code == 503 and "internal error" in h.json()["reason"]
        for path, body in [
            ("/v1/chat/completions", chat(max_tokens=2)),
            ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
        ]:
            e = error_of(c.post(path, json=body), 503)
            assert e["code"] == "unavailable" and e["type"] == "server_error"
    died = [r for r in caplog.records if "engine loop stopped" in r.getMessage()]
    assert len(died) == 1 and not died[0].exc_info  # one line, no traceback
    assert "RuntimeError: reaping broke\\r\\nFAKE" in died[0].getMessage()
    assert "Traceback" not in caplog.text


def test_the_engine_error_log_has_a_traceback_only_in_debug_mode(monkeypatch, caplog):
    from qwenlm.generation import scheduler

    caplog.set_level(logging.ERROR, logger="qwenlm")
    try:
        raise ValueError("x")
    except ValueError as e:
        scheduler._log_error("quiet", e)
        monkeypatch.setenv("QWENLM_DEBUG", "1")
        scheduler._log_error("loud", e)
    quiet, loud = caplog.records[-2:]
    assert not quiet.exc_info and loud.exc_info


def test_serve_exits_with_an_error_when_the_engine_dies(monkeypatch):
    def broken(self) -> None:
        raise RuntimeError("reaping broke")

    model, port, outcome = serving_qwen(), free_port(), {}
    monkeypatch.setattr(Scheduler, "_reap", broken)  # the scheduler serve() builds

    def run() -> None:
        try:
            serve(model, port=port, access_log=False, log_level="critical")
        except Exception as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            r = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=30)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
    assert r.status_code == 500
    thread.join(30)
    assert not thread.is_alive(), "the server kept running with a dead engine"
    assert isinstance(outcome.get("error"), EngineFailed)
    assert "RuntimeError" in outcome["error"].message and outcome["error"].hint


def test_a_wedged_engine_cannot_hang_a_client(monkeypatch):
    cfg = ServeConfig(request_timeout=0.5, stall_timeout=1.0)
    with LiveServer(serving_qwen(), cfg) as s:
        engine, release = s.service.model.engine, threading.Event()
        real = engine.prefill_part

        def stuck(*args, **kwargs):
            release.wait(30)
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "prefill_part", stuck)
        try:
            r = httpx.post(s.url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=20)
            assert error_of(r, 504)["code"] == "timeout"
            h = httpx.get(s.url + "/health", timeout=5)
            assert h.status_code == 503 and "no progress" in h.json()["reason"]
            r = httpx.post(s.url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=5)
            assert error_of(r, 503)["code"] == "unavailable"
        finally:
            release.set()
        deadline = time.monotonic() + 10  # the step returns: healthy and serving again
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (
            httpx.post(s.url + "/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
        )


# -- 2. one request cannot stall the server (checklist 3, 15) -------------------------------
def test_health_answers_while_a_request_is_being_preprocessed(server, monkeypatch):
    qwen = server.service.model
    entered, release, result = threading.Event(), threading.Event(), {}
    real = qwen.encode_chat

    def slow(*args, **kwargs):  # a template render or tokenization that takes its time
        entered.set()
        release.wait(20)
        return real(*args, **kwargs)

    def send() -> None:
        body = chat(max_tokens=2)
        result["r"] = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH)

    monkeypatch.setattr(qwen, "encode_chat", slow)
    thread = threading.Thread(target=send)
    thread.start()
    try:
        assert entered.wait(20)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert httpx.get(server.url + "/v1/models", headers=AUTH, timeout=5).status_code == 200
    finally:
        release.set()
        thread.join(30)
    assert result["r"].status_code == 200


def test_huge_inputs_are_refused_before_any_template_or_tokenizer_runs(server, client, monkeypatch):
    qwen, touched = server.service.model, []
    monkeypatch.setattr(qwen, "encode_chat", lambda *a, **k: touched.append("template") or [1])
    monkeypatch.setattr(qwen.tokenizer, "encode", lambda *a, **k: touched.append("tok") or [1])
    many = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 100_000}
    e = error_of(client.post("/v1/chat/completions", json=many), 400)
    assert e["param"] == "messages" and e["code"] == "array_above_max_length"
    e = error_of(client.post("/v1/chat/completions", json=chat("x" * 5_000_000)), 400)
    assert e["param"] == "messages" and e["code"] == "context_length_exceeded"
    body = {"model": "tiny", "prompt": "x" * 5_000_000}
    e = error_of(client.post("/v1/completions", json=body), 400)
    assert e["param"] == "prompt" and e["code"] == "context_length_exceeded"
    assert touched == []


def test_oversized_bodies_and_headers_are_refused_before_reading(server):
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}"
        "\r\nContent-Type: application/json\r\nContent-Length: 52428800\r\n\r\n"
    )
    reply = raw_exchange(server.port, head.encode())  # 50 MB announced, none sent
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    big = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * MiB + b"\r\n\r\n"
    reply = raw_exchange(server.port, big)
    assert reply == b"" or reply.split(b" ")[1] in (b"400", b"431"), reply[:100]
    assert httpx.get(server.url + "/health").status_code == 200


# -- 3. browser attack paths (checklist 22, 11) -----------------------------------------------
def test_only_requests_naming_an_allowed_host_are_answered(server):
    for host in ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.x"]:
        e = error_of(httpx.get(server.url + "/health", headers={"Host": host}), 403)
        assert e["code"] == "host_not_allowed" and e["type"] == "permission_error"
    for host in ["127.0.0.1", f"127.0.0.1:{server.port}", "localhost:1", "LOCALHOST", "[::1]:80"]:
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200
    for line in (f"Host: :{server.port}", "Host: "):  # an empty name
        reply = raw_exchange(server.port, f"GET /health HTTP/1.1\r\n{line}\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 403"), reply[:100]


def test_allowed_host_names_and_the_wildcard():
    guard = Guard(None, allowed_hosts=["api.example", "10.0.0.5", "fe80::1"])
    allowed = {
        "api.example:443": True,
        "API.example.": True,
        "10.0.0.5:8000": True,
        "[fe80::1]:8000": True,
        "[::1]": True,
        "10.0.0.6": False,
        "": False,
        "[fe80::1": False,
    }
    for host, ok in allowed.items():
        assert guard.host_allowed({b"host": host.encode()}) is ok, host
    assert Guard(None, allowed_hosts=["*"]).host_allowed({b"host": b"evil.example"})
    assert host_name("[::1]:8000") == "[::1]" and host_name("::1") == "[::1]"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_routes_need_a_json_content_type(client, path):
    body = chat(max_tokens=1) if "chat" in path else {"model": "tiny", "prompt": "hi"}
    raw = json.dumps({**body, "max_tokens": 1})
    for ctype in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]:
        r = client.post(path, content=raw, headers={"Content-Type": ctype})
        assert error_of(r, 415)["code"] == "unsupported_media_type"
    for ctype in ["application/json; charset=utf-8", "Application/JSON"]:
        assert client.post(path, content=raw, headers={"Content-Type": ctype}).status_code == 200


# -- 4. faults mid-stream (checklist 7) -------------------------------------------------------
def test_a_failed_stream_ends_with_an_error_frame_then_done(server, client, monkeypatch):
    engine = server.service.model.engine

    def failing(*args, **kwargs):
        raise RuntimeError("a decode step failed")

    monkeypatch.setattr(engine, "forward", failing)  # the prefill gives the first token
    body = chat(max_tokens=5, ignore_eos=True, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: ") :])
    assert set(error) == {"error"} and error["error"]["code"] == "engine_error"
    e = error_of(client.post("/v1/chat/completions", json={**body, "stream": False}), 500)
    assert e["code"] == "engine_error"
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_one_failing_forward_pass_fails_only_its_request():
    qwen = serving_qwen()
    engine, tok = qwen.engine, qwen.tokenizer
    prompts = [tok.encode(f"hello world {i} " * 3) for i in range(4)]
    config = qwen.generation_config(max_new_tokens=12, temperature=0, ignore_eos=True)

    def run() -> dict[int, list]:
        outs: dict[int, list] = {i: [] for i in range(4)}
        requests = [
            Request(p, config, lambda out, i=i: outs[i].append(out)) for i, p in enumerate(prompts)
        ]
        Scheduler(engine, tok, max_num_seqs=8, prefix_cache_tokens=0).run(requests)
        return outs

    clean = run()
    bad, real, groups = prompts[3], engine.forward, []

    def forward(segments, **kwargs):  # fails whenever the last request's sequence is in it
        if any(seq.tokens[: len(bad)] == bad for seq, _ in segments):
            groups.append(len(segments))
            raise RuntimeError("a bad row")
        return real(segments, **kwargs)

    engine.forward = forward
    try:
        faulty = run()
    finally:
        del engine.forward
    assert max(groups) > 1 and groups[-1] == 1  # batched with the others, then retried alone
    assert faulty[3][-1].error is not None
    for i in range(3):
        ids = [t for out in faulty[i] for t in out.token_ids]
        assert ids == [t for out in clean[i] for t in out.token_ids] and len(ids) == 12
        assert faulty[i][-1].finish_reason == "length" and faulty[i][-1].error is None


# -- 5. smaller promises (checklist 18, 19, 24) ------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD_TOOLS = [
    (chat(tools=[]), "tools", "empty_array"),
    (chat(tool_choice="required"), "tool_choice", None),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}), None, None),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), None, None),
    (chat(tools=[{"type": "function", "function": {"parameters": {}}}]), "tools[0]", None),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_TOOLS)
def test_tool_definitions_are_checked(client, body, param, code):
    e = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert e["param"] == param or (param is None and e["param"]), e
    assert code is None or e["code"] == code


def test_every_response_carries_a_request_id(server, client):
    r = client.get("/health", headers={"X-Request-Id": "trace-1.A:b_c"})
    assert r.headers["x-request-id"] == "trace-1.A:b_c"
    responses = [
        client.get("/health", headers={"X-Request-Id": "has space"}),
        client.get("/health", headers={"X-Request-Id": "x" * 200}),
        client.post("/v1/chat/completions", json=chat(max_tokens=1)),
        client.post("/v1/chat/completions", json=chat(temperature=9)),
        client.post("/v1/chat/completions", content="{}", headers={"Content-Type": "text/plain"}),
        client.get("/v1/nothing"),
        httpx.get(server.url + "/v1/models"),
        httpx.get(server.url + "/health", headers={"Host": "evil.example"}),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 415, 404, 401, 403]
    ids = {r.headers["x-request-id"] for r in responses}
    assert len(ids) == len(responses) and all(len(i) == 32 for i in ids)


def test_the_key_is_compared_exactly_and_in_constant_time(server):
    guard = Guard(None, api_key=KEY)
    for auth, ok in {
        f"Bearer {KEY}": True,
        f"bearer {KEY}": True,
        f"Bearer {KEY} ": False,  # uvicorn's h11 strips this one before it reaches us
        f"Bearer  {KEY}": False,
        f"Bearer\t{KEY}": False,
        "Bearer ": False,
        KEY: False,
        "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode(): True,
        "Basic " + base64.b64encode(f"{KEY}:".encode()).decode(): False,
    }.items():
        assert guard.authorized({b"authorization": auth.encode()}) is ok, auth
    assert "hmac.compare_digest" in inspect.getsource(Guard.authorized)
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer  {KEY}"})
    assert error_of(r, 401)["code"] == "invalid_api_key"


def _route_requests(server):
    """(method, path, json body) for every route of the app, enumerated from the app itself."""
    app = server.app
    while not hasattr(app, "routes"):
        app = app.app
    out = []
    for route in app.routes:
        path = route.path.replace("{model:path}", "tiny").replace("{name}", "app.js")
        for method in sorted(route.methods - {"HEAD"}):
            body = None
            if method == "POST":
                # fits chat, completions, embeddings and Ollama's chat / generate / embed
                # (and /detokenize's tokens)
                body = {**chat(max_tokens=1), "prompt": "hi", "input": "hi", "stream": False}
                body["tokens"] = [1, 2]
            out.append((method, path, body))
    return out


OPEN_PATHS = {"/health"}  # the documented allowlist: answered without the key


def test_every_route_but_the_health_probe_needs_the_key(server, caplog):
    requests = _route_requests(server)
    assert len(requests) >= 8 and ("GET", "/health", None) in requests
    basic = "Basic " + base64.b64encode(b"me:wrong").decode()
    bad = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": basic}]
    bad += [
        {"Authorization": KEY},
        {"Authorization": f"Bearer {KEY}x"},
    ]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for method, path, body in requests:
            for headers in bad:
                r = c.request(method, path, json=body, headers=headers)
                if path in OPEN_PATHS:
                    assert r.status_code == 200, (method, path)
                elif path.startswith("/api/"):  # Ollama's routes answer in Ollama's shape
                    assert r.status_code == 401 and "API key" in r.json()["error"], (method, path)
                    assert KEY not in r.text
                else:
                    assert error_of(r, 401)["code"] == "invalid_api_key", (method, path)
                    assert KEY not in r.text
            r = c.request(method, path, json=body, headers=AUTH)
            # (a new route: give it a body); /api/pull names a model the registry lacks; the
            # adapter routes are off without --enable-lora (a 400 that says so)
            off = {"/api/pull": 404, "/v1/load_lora_adapter": 400, "/v1/unload_lora_adapter": 400}
            want = off.get(path, 200)
            assert r.status_code == want, (method, path, r.text)
    assert KEY not in caplog.text


def test_health_can_be_made_to_need_the_key():
    cfg = ServeConfig(api_key=KEY, health_requires_key=True)
    with LiveServer(serving_qwen(), cfg) as s:
        assert error_of(httpx.get(s.url + "/health"), 401)["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health", headers=AUTH).status_code == 200


def test_cors_preflight_passes_without_the_key_and_never_allows_credentials():
    cfg = ServeConfig(api_key=KEY, cors_origins=("http://page.example",))
    with LiveServer(serving_qwen(), cfg) as s:
        preflight = {
            "Origin": "http://page.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        r = httpx.options(s.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://page.example"
        assert "access-control-allow-credentials" not in r.headers
        r = httpx.options(s.url + "/v1/chat/completions", headers={**preflight, "Origin": "x"})
        assert "access-control-allow-origin" not in r.headers


def test_errors_and_logs_hold_nothing_internal(server, client, monkeypatch, caplog):
    class Broken:
        def iterdir(self):
            raise RuntimeError(f"secret at {Path.home()} in <object at 0x7f00>")

    caplog.set_level(logging.ERROR, logger="qwenlm")
    monkeypatch.setattr("qwenlm.serve.app.STATIC", Broken())
    request = (
        "GET /static/x%0D%0AFAKE:%20injected HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\n\r\n"
    )
    head, _, body = raw_exchange(server.port, request.encode()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500")
    assert json.loads(body)["error"] == {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    rid = next(h for h in head.split(b"\r\n") if h.startswith(b"x-request-id: "))[14:]
    deadline = time.monotonic() + 10  # the error is logged once the response has gone out
    while not (lines := [r.getMessage() for r in caplog.records if "internal" in r.getMessage()]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (line,) = lines
    assert "\r" not in line and "\n" not in line and "x\\r\\nFAKE" in line
    assert rid.decode() in line and "RuntimeError" in line
    assert "secret" not in line and "0x7f00" not in line and "Traceback" not in caplog.text
    monkeypatch.undo()
    for r in [
        client.get("/v1/nothing/" + "a" * 300),
        client.post("/v1/chat/completions", content=b"{\xff", headers=JSON),
        client.post("/v1/chat/completions", json=chat(temperature="hot")),
        client.get("/v1/models/gpt-4"),
    ]:
        assert r.status_code in (400, 404)
        for leak in ("Traceback", str(Path.home()), "/work/", "site-packages", " at 0x"):
            assert leak not in r.text, (leak, r.text)


def test_help_never_shows_the_key(monkeypatch, capsys):
    from qwenlm.cli import main

    monkeypatch.setenv("QWENLM_API_KEY", "sk-never-shown-123")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr()
    assert "sk-never-shown-123" not in out.out + out.err and "--allowed-host" in out.out


# -- bad input tables (checklist 11, 12, 13, 25) ---------------------------------------------
BAD_SHAPES = [b"x{{", b"[1,2]", b"42", b"null", b"", b'"str"']


@pytest.mark.parametrize("raw", BAD_SHAPES)
def test_bodies_that_are_not_an_object_are_400(client, raw):
    e = error_of(client.post("/v1/chat/completions", content=raw, headers=JSON), 400)
    assert e["code"] in ("invalid_json", "invalid_type")


BAD_MESSAGES = [
    (None, "messages"),
    ("str", "messages"),
    ([], "messages"),
    ([123], "messages[0]"),
    ([{}], "messages[0].role"),
    ([{"role": 123}], "messages[0].role"),
    ([{"role": "system", "content": 123}], "messages[0].content"),
    ([{"role": "hacker", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "image"}]}], None),
]


@pytest.mark.parametrize(("messages", "param"), BAD_MESSAGES)
def test_the_messages_table(client, messages, param):
    body = {"model": "tiny", "messages": messages}
    e = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert e["param"] == param or (param is None and e["param"].startswith("messages[1]"))


BAD_PARAMS = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 1e30}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"seed": 2**64}, "seed"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"chat_template": "{{ 7 * 7 }}"}, "chat_template"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_PARAMS)
def test_parameter_ranges(client, fields, param):
    e = error_of(client.post("/v1/chat/completions", json=chat(**fields)), 400)
    assert e["param"] == param
    assert client.post("/v1/chat/completions", json=chat(max_tokens=1)).status_code == 200


@pytest.mark.parametrize("max_tokens", range(1, 9))
def test_streams_are_strict_utf8_and_equal_the_whole_reply(client, max_tokens):
    # The tiny vocabulary is mostly single bytes: replies cut inside multi-byte characters.
    body = chat("你好, 世界 🎉", max_tokens=max_tokens, temperature=1.0, seed=max_tokens)
    body["ignore_eos"] = True
    whole = client.post("/v1/chat/completions", json=body).json()
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream) as r:
        raw = b"".join(r.iter_raw())
    events = [block for block in raw.split(b"\n\n") if block]
    assert events[-1] == b"data: [DONE]"
    texts, finishes, usage = [], 0, None
    for block in events[:-1]:
        line = block.decode("utf-8")  # strict, as openai-python reads it
        chunk = json.loads(line.removeprefix("data: "))
        if chunk["choices"]:
            texts.append(chunk["choices"][0]["delta"].get("content", ""))
            finishes += chunk["choices"][0]["finish_reason"] is not None
        else:
            usage = chunk["usage"]
    assert "".join(texts) == whole["choices"][0]["message"]["content"]
    assert finishes == 1 and usage == whole["usage"]


# -- 6. load (checklist 1, 2, 3, 14, 16) ------------------------------------------------------
def _outcomes(url: str) -> dict[str, float]:
    names = ["cancelled", "length", "stop", "timeout", "error"]
    out = {k: metric(httpx, f'qwenlm_requests_total{{outcome="{k}"}}', url) for k in names}
    out["499"] = metric(httpx, 'qwenlm_http_responses_total{code="499"}', url)
    return out


def test_a_cancellation_flood_leaves_the_server_idle_and_serving(roomy):
    before = _outcomes(roomy.url)

    async def flood() -> list[bytes]:
        # Raw connections, so every request reaches the server however slowly the 200
        # connections are accepted; each client gives up 0.5 s after sending.
        async def one(i: int) -> bytes:
            body = json.dumps(chat(f"tell a long story {i}", ignore_eos=True)).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", roomy.port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(100), 0.5)
            except TimeoutError:
                return b""
            finally:
                writer.close()

        return await asyncio.gather(*(one(i) for i in range(200)))

    assert asyncio.run(flood()) == [b""] * 200  # no reply within the clients' timeout
    wait_idle(roomy.url, 30)
    r = httpx.post(
        roomy.url + "/v1/chat/completions", json=chat(max_tokens=10, ignore_eos=True), timeout=5
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
    assert metric(httpx, "qwenlm_requests_running", roomy.url) == 0
    assert metric(httpx, "qwenlm_requests_waiting", roomy.url) == 0
    deadline = time.monotonic() + 10  # each handler counts its response as it ends
    while (after := _outcomes(roomy.url))["499"] - before["499"] < 200:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    # Every flood request was cancelled and its handler ended (499, for no one); only the
    # 10-token one finished.
    assert {k: after[k] - before[k] for k in after} == {
        "499": 200,
        "cancelled": 200,
        "length": 1,
        "stop": 0,
        "timeout": 0,
        "error": 0,
    }


def test_health_and_short_requests_answer_during_a_long_generation(roomy):
    body = chat(max_tokens=8000, ignore_eos=True, stream=True)
    with (
        httpx.Client(base_url=roomy.url, timeout=30) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as long,
    ):
        lines = long.iter_lines()
        for _ in range(5):
            next(lines)
        for _ in range(5):
            assert c.get("/health", timeout=2).json()["running"] >= 1
            assert c.get("/v1/models", timeout=2).status_code == 200
        r = c.post("/v1/chat/completions", json=chat(max_tokens=3))
        assert r.status_code == 200
    wait_idle(roomy.url, 10)


def test_a_bounded_queue_takes_two_running_and_two_waiting(monkeypatch):
    cfg = ServeConfig(max_num_seqs=2, max_queue=2)
    with LiveServer(serving_qwen(max_position_embeddings=8192), cfg) as s:
        engine, gate = s.service.model.engine, threading.Event()
        real = engine.forward

        def gated(segments, **kwargs):  # holds the batch once both slots are decoding
            if len(segments) >= 2:
                gate.wait(30)
            return real(segments, **kwargs)

        monkeypatch.setattr(engine, "forward", gated)
        results: dict[int, httpx.Response] = {}

        def send(i: int) -> threading.Thread:
            body = chat(f"question {i}", max_tokens=200, ignore_eos=True)
            url = s.url + "/v1/chat/completions"

            def post() -> None:
                results[i] = httpx.post(url, json=body, timeout=60)

            t = threading.Thread(target=post)
            t.start()
            return t

        def until(running: int, waiting: int) -> None:
            deadline = time.monotonic() + 20
            while (h := httpx.get(s.url + "/health").json())["running"] != running or (
                h["waiting"] != waiting
            ):
                assert time.monotonic() < deadline, h
                time.sleep(0.01)

        try:
            accepted = [send(0), send(1)]
            until(2, 0)
            accepted += [send(2), send(3)]
            until(2, 2)
            refused = [send(i) for i in range(4, 10)]
            for t in refused:
                t.join(10)
            assert not gate.is_set()  # answered while the four still wait
            for i in range(4, 10):
                assert error_of(results[i], 503)["code"] == "server_overloaded"
                assert results[i].headers["retry-after"] == "1"
        finally:
            gate.set()
        for t in accepted:
            t.join(60)
        for i in range(4):
            assert results[i].status_code == 200
            assert results[i].json()["usage"]["completion_tokens"] == 200


def test_the_context_boundary(client):
    def complete(ids, **extra):
        body = {"model": "tiny", "prompt": ids, "ignore_eos": True, **extra}
        return client.post("/v1/completions", json=body)

    r = complete([5] * 511, max_tokens=1)  # the tiny model's context is 512
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    e = error_of(complete([5] * 512, max_tokens=1), 400)
    assert e["code"] == "context_length_exceeded"
    assert e["message"].startswith("This model's maximum context length is 512 tokens.")
    assert error_of(complete([5] * 500, max_tokens=13), 400)["code"] == "context_length_exceeded"
    r = complete([5] * 500)  # max_tokens left out: the rest of the context
    assert r.json()["usage"]["completion_tokens"] == 12


def test_unicode_and_token_id_edge_cases(client):
    for text in [
        "a\x00b",
        "\u202eevil\u202c",
        "\U0001f469\u200d\U0001f469\u200d\U0001f467",
        "\ufeff",
    ]:
        r = client.post("/v1/chat/completions", json=chat(text, max_tokens=2))
        assert r.status_code == 200 and isinstance(
            r.json()["choices"][0]["message"]["content"], str
        )
    for prompt, param in [([999999], "prompt"), ([-1], "prompt"), ([[1], [-1]], "prompt[1]")]:
        e = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": prompt}), 400)
        assert e["param"] == param
    for prompt in [[], [True], [1.5], "", [[]]]:
        error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": prompt}), 400)


# -- graceful shutdown (checklist 8): the real `qwenlm serve` process ---------------------------
def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


@pytest.mark.slow
def test_sigterm_drains_running_requests_and_exits(tmp_path):
    model = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, tiny_config(max_position_embeddings=8192))
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "qwenlm", "serve", str(model), "--port", str(port)]
    cmd += ["--served-model-name", "tiny", "--shutdown-timeout", "2", "--no-access-log"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        streams: dict[int, list[str]] = {}

        def stream(i: int) -> None:
            body = chat(f"story {i}", max_tokens=8000, ignore_eos=True, stream=True)
            lines = streams.setdefault(i, [])
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=5).json()["running"] < 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # new requests are refused once the signal is handled
            try:
                r = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=1), timeout=10)
                if r.status_code == 503:
                    break
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        for t in threads:
            t.join(30)
        for i in range(10):
            lines = streams[i]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            last = json.loads(lines[-2][len("data: ") :])
            assert "error" in last or last["choices"][0]["finish_reason"], last
        assert not [c for c in children if os.path.exists(f"/proc/{c}")]
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
