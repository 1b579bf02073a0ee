"""The HTTP layer under the API: bodies in, server-sent events out, and the guard around it all.

:class:`Guard` is a plain ASGI wrapper around the whole application: it answers only requests
that name an allowed host (DNS rebinding), checks the API key on every route but the health
probe (in constant time), tags every response with an ``X-Request-Id``, answers every failure
in OpenAI's error shape and never lets an exception, or its traceback, reach the client or
the log. :class:`Server` is uvicorn's server with a graceful drain and an exit when the engine
dies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import FrameType
from typing import Any

import anyio
import uvicorn
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from qwenlm.errors import debug_tracebacks, loggable
from qwenlm.generation import scheduler as engine
from qwenlm.generation.scheduler import Output, Scheduler
from qwenlm.serve import protocol as P
from qwenlm.serve.protocol import APIError

log = logging.getLogger("qwenlm.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # a client's id is echoed only if sane
_DONE = b"data: [DONE]\n\n"


class Job:
    """A submitted request as the HTTP side holds it: its events arrive on ``events``; past
    ``deadline`` (monotonic) the HTTP side stops waiting for them, whatever the engine does."""

    def __init__(
        self, request: engine.Request, events: asyncio.Queue[Output], deadline: float
    ) -> None:
        self.request = request
        self.events = events
        self.deadline = deadline

    @property
    def n(self) -> int:
        return self.request.n

    def cancel(self) -> None:
        """Stop generating (the client left); the scheduler drops it at its next step."""
        self.request.cancel()


async def next_event(events: asyncio.Queue[Output], jobs: Sequence[Job]) -> Output:
    """The next engine event for ``jobs``; a 504 once their deadline passes without one, so an
    engine that stopped answering cannot hold a client forever."""
    left = max(j.deadline for j in jobs) - time.monotonic()
    try:
        # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives as
        # an event does, and the handler would then outlive its client.
        async with asyncio.timeout(max(left, 0.0)):
            return await events.get()
    except TimeoutError:
        raise APIError(
            504,
            "The engine did not answer within the request timeout; the request was abandoned.",
            type="server_error",
            code="timeout",
        ) from None


def internal_error() -> APIError:
    """The one 500 a client sees, whatever failed: the details go to the log only."""
    return APIError(
        500,
        "The server had an error while processing your request.",
        type="server_error",
        code="internal_error",
    )


def sse_event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def log_failure(what: str, e: BaseException, request_id: str = "-") -> None:
    """One log line naming a failure and the request; the traceback only with QWENLM_DEBUG=1."""
    log.error(
        "%s [request %s]: %s",
        loggable(what),
        request_id,
        type(e).__name__,
        exc_info=debug_tracebacks(),
    )


class SSE:
    """A server-sent-event stream that stops its jobs the moment the client disconnects.

    ``chunks`` yields the events; an error while it runs becomes an OpenAI error frame, and the
    stream always ends with ``data: [DONE]`` (what clients wait for).
    """

    content_type = b"text/event-stream; charset=utf-8"
    done: bytes | None = _DONE  # the stream's last frame

    def __init__(self, chunks: AsyncIterator[bytes], jobs: list[Job]) -> None:
        self.chunks = chunks
        self.jobs = jobs

    async def frames(self, request_id: str) -> AsyncIterator[bytes]:
        try:
            async for data in self.chunks:
                yield data
        except APIError as e:
            yield self.error_frame(e)
        except Exception as e:  # the response has started: an error frame is all we can send
            log_failure("stream failed", e, request_id)
            yield self.error_frame(internal_error())
        if self.done is not None:
            yield self.done

    def error_frame(self, e: APIError) -> bytes:
        return sse_event(e.body())

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
                        async for data in self.frames(
                            scope.get("state", {}).get("request_id", "-")
                        ):
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


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, jobs: list[Job], gen: AsyncIterator[Any]) -> list[Any]:
    """Everything ``gen`` yields. If the client leaves first, its jobs are cancelled and the
    waiting ends at once (with a 499 nobody receives): no handler outlives its client."""

    async def gather() -> list[Any]:
        return [item async for item in gen]

    consumer = asyncio.ensure_future(gather())
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for job in jobs:
            job.cancel()
        for task in (consumer, watcher):
            if not task.done():
                task.cancel()
        await asyncio.gather(consumer, watcher, return_exceptions=True)
    if not consumer.cancelled():
        return consumer.result()
    raise APIError(499, "The client closed the connection before the reply.", code="client_gone")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body, at most ``limit`` bytes (413 past it), parsed by :func:`protocol.parse_json_body`
    on a worker thread (a large body must not stall the event loop).

    Only ``Content-Type: application/json`` is read (415 otherwise): a browser sends JSON to
    another origin only after a CORS preflight, while a cross-site form post (``text/plain``,
    ``application/x-www-form-urlencoded``) needs none.
    """
    ctype = request.headers.get("content-type", "")
    if ctype.partition(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            f"Unsupported Content-Type {ctype[:100]!r}: send the body as JSON with "
            "'Content-Type: application/json'.",
            code="unsupported_media_type",
        )
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
    return await run_in_threadpool(P.parse_json_body, b"".join(parts))


def is_ollama(path: str) -> bool:
    """Whether ``path`` is one of Ollama's routes, whose errors are ``{"error": "message"}``."""
    return path.startswith("/api/")


def error_response(e: APIError, path: str = "") -> Response:
    """``e`` in OpenAI's error shape, or Ollama's for Ollama's routes."""
    body = {"error": e.message} if is_ollama(path) else e.body()
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def host_name(host: str) -> str:
    """The name part of a Host header value or an allowed-host entry, without port, lowercased;
    IPv6 literals keep their brackets (``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else ""
    if host.count(":") > 1:  # a bare IPv6 address given as an allowed host
        return f"[{host}]"
    return host.partition(":")[0].rstrip(".")


class Guard:
    """Allowed hosts, the API key (constant-time), request ids, error shape, no tracebacks,
    response counts: everything every route needs, around the whole application."""

    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None = None,
        cors: bool = False,
        state: Any = None,
        allowed_hosts: Sequence[str] = (),
        open_paths: Sequence[str] = ("/health",),
    ) -> None:
        """``cors``: let preflight requests (which carry no key) through to the CORS layer.
        ``state`` is the app's state, for ``create_app``'s callers. ``allowed_hosts``: names
        the Host header may carry besides the loopback ones (``*``: any). ``open_paths``: routes
        answered without the key (the health probe of a load balancer)."""
        self.app = app
        self.cors = cors
        self.state = state
        self.responses: dict[int, int] = {}  # status -> count, for /metrics
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.any_host = "*" in allowed_hosts
        self.hosts = {host_name(h) for h in (*LOOPBACK_HOSTS, *allowed_hosts)} - {""}
        self.open_paths = frozenset(open_paths)

    def host_allowed(self, headers: dict[bytes, bytes]) -> bool:
        if self.any_host:
            return True
        return host_name(headers.get(b"host", b"").decode("latin-1")) in self.hosts

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.key_digest is None:
            return True
        # Exactly "Bearer KEY" (the scheme in any case, one space): no stripping, so a key
        # with stray whitespace is a wrong key.
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, value = auth.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value
        elif scheme.lower() == "basic":
            # The web page: the browser's own login prompt, the key as the password.
            try:
                given = base64.b64decode(value, validate=True).decode().partition(":")[2]
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
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"")
        if not _REQUEST_ID.fullmatch(rid):
            rid = secrets.token_hex(16).encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-request-id", rid),
                ]
            await send(message)

        try:
            if not self.host_allowed(headers):
                # A page on another site that rebound its DNS name to this address sends its
                # own name here; only names this server answers to get through.
                host = headers.get(b"host", b"").decode("latin-1")
                e = APIError(
                    403,
                    f"Host {host[:100]!r} is not allowed. Start the server with "
                    "--allowed-host NAME to answer to that name.",
                    type="permission_error",
                    code="host_not_allowed",
                )
                await error_response(e, scope.get("path", ""))(scope, receive, tracked_send)
            elif scope.get("method") == "OPTIONS" and self.cors:
                await self.app(scope, receive, tracked_send)
            elif scope["path"] not in self.open_paths and not self.authorized(headers):
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
            log_failure(f"internal error on {scope.get('path', '?')}", e, rid.decode())
            if not started:
                with contextlib.suppress(Exception):
                    await error_response(internal_error(), scope.get("path", ""))(
                        scope, receive, tracked_send
                    )
        finally:
            self.responses[status] = self.responses.get(status, 0) + 1


class Server(uvicorn.Server):
    """uvicorn's server, plus: SIGTERM / Ctrl-C first drains the scheduler (no new request;
    those running get ``drain_timeout`` seconds, then end with an error frame), and the server
    shuts down when the engine loop has died, so the process exits and a supervisor restarts
    it (see :func:`qwenlm.serve.serve`)."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_timeout: float) -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.scheduler.drain(self.drain_timeout)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if not self.scheduler.alive and not self.should_exit:
            log.error("the engine loop died; shutting the server down")
            self.should_exit = True
        return await super().on_tick(counter)
