"""Embeddings over HTTP: OpenAI's ``/v1/embeddings``, and the runner Ollama's routes share.

The vectors are the model's (:mod:`qwenlm.generation.embed`: the mean of the final hidden
states, unit length). The forward passes run on the engine's thread, one between two
generation steps each (:meth:`~qwenlm.generation.scheduler.Scheduler.call`), so embedding a
large batch slows running streams down a little but never stalls them.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from qwenlm.errors import GenerationError
from qwenlm.generation.scheduler import EngineFailed
from qwenlm.serve import protocol as P
from qwenlm.serve.http import read_json, until_disconnect
from qwenlm.serve.protocol import APIError

if TYPE_CHECKING:
    from qwenlm.serve.app import Service

MAX_INPUTS = 2048  # OpenAI's limit per request


def token_ids(
    svc: Service,
    items: Sequence[str | Sequence[int]],
    param: str,
    *,
    truncate: bool = False,
    context: int | None = None,
) -> list[list[int]]:
    """The inputs as token ids (text encoded as plain text), each within the context (the
    server's, or ``context`` if smaller); ``truncate`` cuts longer ones at its end instead of
    refusing them."""
    context = min(context or svc.context, svc.context)
    if len(items) > MAX_INPUTS:
        raise P.invalid(
            f"Invalid '{param}': at most {MAX_INPUTS} inputs per request, got {len(items)}.",
            param=param,
        )
    tok = svc.model.tokenizer
    out = []
    for i, x in enumerate(items):
        ids = tok.encode(x) if isinstance(x, str) else [int(t) for t in x]
        if not ids:
            raise P.invalid(f"Invalid '{param}[{i}]': the input is empty.", param=param)
        if len(ids) > context:
            if not truncate:
                raise P.invalid(
                    f"This model's maximum context length is {context} tokens, however you "
                    f"requested {len(ids)} tokens in {param}[{i}]. Please reduce your input.",
                    param=param,
                    code="context_length_exceeded",
                )
            ids = ids[:context]
        out.append(ids)
    return out


async def embed(request: Request, svc: Service, ids: list[list[int]]) -> list[list[float]]:
    """Unit-length vectors of ``ids``; stops early if the client disconnects."""
    try:
        embedder = svc.model.embedder(ids)
    except GenerationError as e:
        raise P.invalid(e.message) from None
    gone = asyncio.create_task(until_disconnect(request))
    try:
        done = False
        while not done:
            if gone.done():
                raise APIError(400, "The client disconnected.")
            try:
                future = svc.scheduler.call(embedder.step)
            except EngineFailed:
                svc.check_available()
                raise P.engine_failed() from None
            done = await asyncio.wrap_future(future)
    finally:
        gone.cancel()
    return embedder.result().tolist()


def _base64(vector: list[float]) -> str:
    # OpenAI's base64 form: the little-endian float32 bytes.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create(request: Request) -> Any:
    """``POST /v1/embeddings``."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    name = P.model_name(body)
    items = P.completion_prompts(body, svc.model.config.vocab_size, "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise P.invalid(
            "Invalid 'encoding_format': expected 'float' or 'base64'.", param="encoding_format"
        )
    size = svc.model.config.hidden_size
    dims = body.get("dimensions")
    if dims is not None and dims != size:
        raise P.invalid(
            f"Invalid 'dimensions': this model's embeddings have {size} dimensions and cannot "
            "be shortened; leave 'dimensions' out.",
            param="dimensions",
        )
    svc.check_model(name)
    ids = token_ids(svc, items, "input")
    vectors = await embed(request, svc, ids)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _base64(v) if fmt == "base64" else v,
        }
        for i, v in enumerate(vectors)
    ]
    tokens = sum(len(x) for x in ids)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": svc.names[0],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
