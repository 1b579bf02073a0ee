"""Live servers on loopback for the serve tests: uvicorn in a thread, or `qwenlm serve` in a
subprocess, on a free port."""

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

import uvicorn

from qwenlm.serve import ServeConfig, create_app


class LiveServer:
    """``with LiveServer(model, config) as s: s.url``; stops the server (and engine) on exit."""

    def __init__(self, model: Any, config: ServeConfig | None = None) -> None:
        self.app = create_app(model, config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, log_level="warning", access_log=False)
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
