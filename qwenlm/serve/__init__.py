"""``qwenlm serve``: an OpenAI-compatible HTTP API with continuous batching, and a web chat page.

Needs the ``serve`` extra (``pip install 'qwenlm[serve]'``: starlette and uvicorn).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qwenlm.generation.scheduler import EngineFailed
from qwenlm.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "serve"]

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    access_log: bool = True,
    log_level: str = "info",
) -> None:
    """Serve ``model`` (a :class:`qwenlm.Qwen`) until interrupted.

    SIGTERM or Ctrl-C drains: no new request, running ones get ``config.shutdown_timeout``
    seconds. If the engine loop dies, the server shuts down and this raises
    :class:`~qwenlm.generation.scheduler.EngineFailed`: the process should exit (the CLI does,
    with status 1) so that a supervisor restarts it; an engine in an unknown state is never
    restarted in place.
    """
    import uvicorn

    from qwenlm.serve.http import Server

    config = config or ServeConfig()
    if host not in WILDCARD_HOSTS:  # the address the server was told to bind is its own name
        config = dataclasses.replace(config, allowed_hosts=(*config.allowed_hosts, host))
    app = create_app(model, config)
    scheduler = app.state.service.scheduler
    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            access_log=access_log,
            log_level=log_level,
            timeout_graceful_shutdown=int(config.shutdown_timeout) + 5,
            server_header=False,
        ),
        scheduler,
        config.shutdown_timeout,
    )
    server.run()
    if scheduler.error is not None:
        raise EngineFailed(
            f"the engine stopped after an internal error ({type(scheduler.error).__name__}); "
            "the server exited",
            hint="run it under a supervisor that restarts it (systemd Restart=on-failure, a "
            "container restart policy); QWENLM_DEBUG=1 logs the traceback",
        )
