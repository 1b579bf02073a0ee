"""A live server on loopback for the serve tests: uvicorn in a thread, on a free port."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from helpers import tiny_config, tiny_model, tiny_template, tiny_tokenizer

from qwenlm.api import Qwen
from qwenlm.generation.fastpath import accelerate
from qwenlm.quant import quantize
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


def serving_qwen(**config: int) -> Qwen:
    """The tiny model as the server tests serve it: int8 weights, fused, on the native path."""
    model = quantize(
        tiny_model(tiny_config(intermediate_size=128, num_hidden_layers=3, **config), std=0.1),
        "int8",
    )
    model.fuse_projections()
    accelerate(model)
    return Qwen(model, tiny_tokenizer(), tiny_template(), name="tiny")
