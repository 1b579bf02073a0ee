"""``qwenlm serve``: an OpenAI-compatible HTTP API with continuous batching, and a web chat page.

Needs the ``serve`` extra (``pip install 'qwenlm[serve]'``: starlette and uvicorn).
"""

from __future__ import annotations

from typing import Any

from qwenlm.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "serve"]


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    access_log: bool = True,
    log_level: str = "info",
) -> None:
    """Serve ``model`` (a :class:`qwenlm.Qwen`) until interrupted."""
    import uvicorn

    app = create_app(model, config)
    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=access_log,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
