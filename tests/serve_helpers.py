"""Live servers on loopback for the serve tests (uvicorn in a thread, or `qwenlm serve` in a
subprocess, on a free port), the tiny model they serve, and the small request helpers the serve
tests share."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from helpers import tiny_config, tiny_model, tiny_template, tiny_tokenizer

from qwenlm.api import Qwen
from qwenlm.generation.fastpath import accelerate
from qwenlm.quant import quantize
from qwenlm.serve import ServeConfig, create_app
from qwenlm.serve.http import Server

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}


def serving_qwen(**config: int) -> Qwen:
    """The tiny model as the server tests serve it: int8 weights, fused, on the native path,
    named ``tiny``."""
    model = quantize(
        tiny_model(tiny_config(intermediate_size=128, num_hidden_layers=3, **config), std=0.1),
        "int8",
    )
    model.fuse_projections()
    accelerate(model)
    return Qwen(model, tiny_tokenizer(), tiny_template(), name="tiny")


class LiveServer:
    """``with LiveServer(model, config) as s: s.url``; stops the server (and engine) on exit.

    ``graceful``: run :class:`qwenlm.serve.http.Server` (drain on exit, shut down when the
    engine dies) as ``qwenlm serve`` does, instead of plain uvicorn.
    """

    def __init__(
        self, model: Any, config: ServeConfig | None = None, *, graceful: bool = False
    ) -> None:
        self.app = create_app(model, config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, log_level="warning", access_log=False)
        if graceful:
            drain = (config or ServeConfig()).shutdown_timeout
            self.server = Server(cfg, self.service.scheduler, drain)
        else:
            self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def service(self) -> Any:
        return self.app.state.service

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def error_of(r: httpx.Response, status: int) -> dict:
    """The error object of ``r``, checked: the status, OpenAI's four keys, nothing internal."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "/work/" not in r.text
    return body["error"]


def metric(client: Any, name: str, base: str = "") -> float:
    """A sample of /metrics (``client``: an httpx client, or the httpx module with ``base``)."""
    for line in client.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def wait_idle(url: str, seconds: float = 2.0) -> None:
    """Until /health shows nothing running or waiting (at most ``seconds``)."""
    deadline = time.monotonic() + seconds
    while (h := httpx.get(url + "/health").json())["running"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_process(args: list[str], log: Path, *, key: str | None = None) -> Iterator[str]:
    """`python -m qwenlm serve ARGS` (the real CLI, from the repository root) on a free port;
    yields its URL once /health answers, then stops it with SIGINT. Its output goes to ``log``."""
    import httpx
    import pytest

    port = free_port()
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "qwenlm", "serve", *args, "--port", str(port)]
    env = {**os.environ, **({"QWENLM_API_KEY": key} if key else {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
