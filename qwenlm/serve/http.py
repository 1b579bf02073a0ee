"""The HTTP layer under the API: bodies in, server-sent events out, and the guard around it all.

:class:`Guard` is a plain ASGI wrapper around the whole application: it checks the API key on
every route (in constant time), answers every failure in OpenAI's error shape and never lets an
exception, or its traceback, reach the client or the log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from qwenlm.generation import scheduler as engine
from qwenlm.generation.scheduler import Output
from qwenlm.serve import protocol as P
from qwenlm.serve.protocol import APIError

log = logging.getLogger("qwenlm.serve")


class Job:
    """A submitted request as the HTTP side holds it: its events arrive on ``events``."""

    def __init__(self, request: engine.Request, events: asyncio.Queue[Output]) -> None:
        self.request = request
        self.events = events

    @property
    def n(self) -> int:
        return self.request.n

    def cancel(self) -> None:
        """Stop generating (the client left); the scheduler drops it at its next step."""
        self.request.cancel()


def sse_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class SSE:
    """A server-sent-event stream that stops its jobs the moment the client disconnects."""

    content_type = b"text/event-stream; charset=utf-8"

    def __init__(self, chunks: AsyncIterator[bytes], jobs: list[Job]) -> None:
        self.chunks = chunks
        self.jobs = jobs

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        headers = [
            (b"content-type", self.content_type),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with anyio.create_task_group() as tg:

                async def pump() -> None:
                    try:
                        async for data in self.chunks:
                            await send(
                                {"type": "http.response.body", "body": data, "more_body": True}
                            )
                        await send({"type": "http.response.body", "body": b""})
                    finally:
                        tg.cancel_scope.cancel()

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(pump)
                tg.start_soon(watch)
        except OSError:
            pass  # the client went away mid-send
        finally:
            for job in self.jobs:
                job.cancel()


async def until_disconnect(request: Request, jobs: list[Job]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.cancel()


async def collect(request: Request, jobs: list[Job], gen: AsyncIterator[Any]) -> list[Any]:
    """Everything ``gen`` yields, while a watcher cancels the jobs if the client leaves."""
    watcher = asyncio.create_task(until_disconnect(request, jobs))
    try:
        return [item async for item in gen]
    finally:
        watcher.cancel()
        for job in jobs:
            job.cancel()


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body, at most ``limit`` bytes (413 past it), parsed by ``protocol.parse_json_body``."""
    too_big = APIError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes).",
        code="request_too_large",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    parts, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            parts.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "The client disconnected while sending the body.") from None
    return P.parse_json_body(b"".join(parts))


def is_ollama(path: str) -> bool:
    """Whether ``path`` is one of Ollama's routes, whose errors are ``{"error": "message"}``."""
    return path.startswith("/api/")


def error_response(e: APIError, path: str = "") -> Response:
    """``e`` in OpenAI's error shape, or Ollama's for Ollama's routes."""
    body = {"error": e.message} if is_ollama(path) else e.body()
    return JSONResponse(body, status_code=e.status, headers=e.headers)


class Guard:
    """API key on every route (constant-time), error shape, no tracebacks, response counts."""

    def __init__(
        self, app: Any, *, api_key: str | None = None, cors: bool = False, state: Any = None
    ) -> None:
        """``cors``: let preflight requests (which carry no key) through to the CORS layer.
        ``state`` is the app's state, for ``create_app``'s callers."""
        self.app = app
        self.cors = cors
        self.state = state
        self.responses: dict[int, int] = {}  # status -> count, for /metrics
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.key_digest is None:
            return True
        auth = headers.get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, value = auth.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            # The web page: the browser's own login prompt, the key as the password.
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        # Digests of equal length: the comparison takes the same time whatever was sent.
        digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self.key_digest)

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        status = 500

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if scope.get("method") == "OPTIONS" and self.cors:
                await self.app(scope, receive, tracked_send)
            elif not self.authorized(headers):
                path = scope["path"]
                page = not path.startswith("/v1/") and not is_ollama(path)
                page = page and path not in ("/health", "/metrics")
                given = b"authorization" in headers
                e = APIError(
                    401,
                    "Incorrect API key provided."
                    if given
                    else "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Basic realm="qwenlm"' if page else "Bearer"},
                )
                await error_response(e, scope["path"])(scope, receive, tracked_send)
            else:
                await self.app(scope, receive, tracked_send)
        except Exception as e:  # the last line: log the kind of failure, never its details
            log.error("internal error on %s: %s", scope.get("path", "?"), type(e).__name__)
            if not started:
                err = APIError(
                    500,
                    "The server had an error while processing your request.",
                    type="server_error",
                    code="internal_error",
                )
                with contextlib.suppress(Exception):
                    await error_response(err, scope.get("path", ""))(scope, receive, tracked_send)
        finally:
            self.responses[status] = self.responses.get(status, 0) + 1
