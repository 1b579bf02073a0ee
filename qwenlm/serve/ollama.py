"""Ollama's API on the same server, for the tools that speak it (the ``ollama`` clients, Open
WebUI, Continue, LangChain's ``ChatOllama``).

``/api/chat`` and ``/api/generate`` stream newline-delimited JSON by default (one object with
``"stream": false``); ``/api/embed`` and the older ``/api/embeddings``; ``/api/tags``,
``/api/show``, ``/api/ps`` and ``/api/version`` describe the served model; ``/api/pull`` fetches
a model of qwenlm's registry with Ollama's progress lines. Requests become the same engine
requests as the OpenAI routes' (:meth:`Service.chat_prompt`, :meth:`Service.submit`), under the
same key, body limit and context checks; errors are Ollama's ``{"error": "message"}``. Model
names may be written as Ollama users write them: the served name, with or without ``:latest``,
or any registry alias of the served model (``qwen2.5-coder:0.5b``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from qwenlm import registry
from qwenlm.chat.tools import ToolCall
from qwenlm.errors import ModelNotFoundError, QwenlmError
from qwenlm.generation.scheduler import Output
from qwenlm.serve import embeddings
from qwenlm.serve import protocol as P
from qwenlm.serve.http import SSE, Job, collect, read_json
from qwenlm.serve.protocol import APIError, SamplingParams
from qwenlm.serve.replies import ChoiceParser, chat_logprobs, deltas

if TYPE_CHECKING:
    from qwenlm.serve.app import Service

log = logging.getLogger("qwenlm.serve")

# The Ollama release whose API these routes follow (clients check it before sending tools,
# structured outputs or `think`).
OLLAMA_VERSION = "0.9.0"
FOREVER = "9999-12-31T23:59:59Z"  # /api/ps: the model stays loaded (keep_alive has no effect)

# Options that map onto the engine's sampling settings.
SAMPLING_OPTIONS = frozenset(
    {
        "num_predict",
        "num_ctx",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repeat_penalty",
        "repeat_last_n",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
    }
)
# Ollama sets these when it loads a model (threads, GPU layers, memory mapping, batch size);
# qwenlm fixes them when the server starts, so a request's values have no effect. Ollama
# itself ignores penalize_newline, and num_keep only matters when Ollama shifts a full context,
# which qwenlm never does (a prompt that does not fit is an error).
IGNORED_OPTIONS = frozenset(
    {
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
        "embedding_only",
        "f16_kv",
        "logits_all",
        "num_keep",
        "penalize_newline",
    }
)
# Samplers qwenlm does not have: only their "off" value is accepted.
OFF_ONLY = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
MAX_STOP = 32  # Continue sends a dozen stop strings for code completion
DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop"}
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
_DURATION = re.compile(r"-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h)?)+")


def routes(endpoint: Callable[[Callable], Callable]) -> list[Route]:
    """Ollama's routes, each handler wrapped by ``endpoint`` (errors into responses)."""
    return [
        Route("/api/chat", endpoint(chat), methods=["POST"]),
        Route("/api/generate", endpoint(generate), methods=["POST"]),
        Route("/api/embed", endpoint(embed), methods=["POST"]),
        Route("/api/embeddings", endpoint(embeddings_v0), methods=["POST"]),
        Route("/api/tags", endpoint(tags)),
        Route("/api/show", endpoint(show), methods=["POST"]),
        Route("/api/ps", endpoint(ps)),
        Route("/api/version", endpoint(version)),
        Route("/api/pull", endpoint(pull), methods=["POST"]),
    ]


class NDJSON(SSE):
    """A stream of JSON lines (Ollama's streaming), stopping its jobs if the client leaves; an
    error is its last line, ``{"error": "..."}``, and nothing follows the final object."""

    content_type = b"application/x-ndjson"
    done = None

    def error_frame(self, e: APIError) -> bytes:
        return json.dumps({"error": e.message}).encode() + b"\n"


def _lines(parts: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    # An error after the 200 went out becomes the stream's last line (NDJSON.error_frame).
    async def gen() -> AsyncIterator[bytes]:
        async for obj in parts:
            yield json.dumps(obj, ensure_ascii=False).encode() + b"\n"

    return gen()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# -- request fields ----------------------------------------------------------------------------
def _model(svc: Service, body: dict[str, Any]) -> str:
    """The model name as the client wrote it, after checking that this server serves it."""
    name = body.get("model", body.get("name"))  # `name`: older clients
    if not isinstance(name, str) or not name:
        raise APIError(400, "model is required")
    if not _serves(svc, name):
        raise APIError(404, f'model "{name}" not found; this server serves {svc.names[0]}')
    return name


def _spec(name: str | None) -> registry.ModelSpec | None:
    try:
        return registry.get_model(name) if name else None
    except ModelNotFoundError:
        return None


def _served_spec(svc: Service) -> registry.ModelSpec | None:
    """The registry entry of the served model, if its name or a served name is one."""
    return next(filter(None, map(_spec, [*svc.names, svc.model.name])), None)


def _serves(svc: Service, name: str) -> bool:
    if name in svc.names or name.removesuffix(":latest") in svc.names:
        return True
    served = _served_spec(svc)
    return served is not None and _spec(name) == served


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise P.invalid(f"Invalid '{name}': expected true or false.", param=name)
    return value


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise P.invalid(f"Invalid '{name}': expected a string.", param=name)
    return value


def _keep_alive(body: dict[str, Any]) -> None:
    """``keep_alive`` is accepted and has no effect: the served model stays loaded."""
    value = body.get("keep_alive")
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    if not isinstance(value, str) or not _DURATION.fullmatch(value.strip()):
        raise P.invalid(
            "Invalid 'keep_alive': expected a duration such as \"5m\" or a number of seconds.",
            param="keep_alive",
        )


def _stop(opts: dict[str, Any]) -> tuple[str, ...]:
    value = opts.get("stop")
    if value is None:
        return ()
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or any(not isinstance(s, str) or not s for s in value):
        raise P.invalid("Invalid 'options.stop': expected non-empty strings.", param="stop")
    if len(value) > MAX_STOP:
        raise P.invalid(f"Invalid 'options.stop': at most {MAX_STOP} strings.", param="stop")
    return tuple(value)


def _options(body: dict[str, Any]) -> tuple[SamplingParams, int | None]:
    """(sampling params, num_ctx) from ``options`` and the top-level ``logprobs`` fields."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise P.invalid("Invalid 'options': expected an object.", param="options")
    unknown = sorted(set(opts) - SAMPLING_OPTIONS - IGNORED_OPTIONS - set(OFF_ONLY))
    if unknown:
        raise P.invalid(
            f"Invalid 'options': unknown option(s) {', '.join(unknown)}; this server reads "
            f"{', '.join(sorted(SAMPLING_OPTIONS))}.",
            param="options",
        )
    for name, off in OFF_ONLY.items():
        if opts.get(name) not in (None, off):
            raise P.invalid(
                f"Invalid 'options.{name}': this server has no {name} sampler; leave it out "
                f"or set it to {off}.",
                param=name,
            )
    last_n = opts.get("repeat_last_n")
    if last_n not in (None, -1, 0):
        raise P.invalid(
            "Invalid 'options.repeat_last_n': repeat_penalty applies to the whole context "
            "here, so repeat_last_n may be -1 (the whole context) or 0 (off).",
            param="repeat_last_n",
        )
    num_predict = P._integer(opts, "num_predict", -(2**62), None, None)
    top_k = P._integer(opts, "top_k", -(2**62), None, None)
    top_p = P._number(opts, "top_p", 0.0, 1.0, None)
    seed = P._integer(opts, "seed", -(2**63), 2**63 - 1, None)
    penalty = P._number(opts, "repeat_penalty", 0.01, 10.0, None)
    top = P._integer(body, "top_logprobs", 0, P.MAX_TOP_LOGPROBS, 0) or 0
    params = SamplingParams(
        max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        temperature=P._number(opts, "temperature", 0.0, math.inf, None),
        top_p=1e-9 if top_p == 0.0 else top_p,
        top_k=None if top_k is None else max(top_k, 0),  # Ollama's 0 or less: off
        min_p=P._number(opts, "min_p", 0.0, 1.0, None),
        repetition_penalty=1.0 if last_n == 0 else penalty,
        presence_penalty=P._number(opts, "presence_penalty", -2.0, 2.0, 0.0) or 0.0,
        frequency_penalty=P._number(opts, "frequency_penalty", -2.0, 2.0, 0.0) or 0.0,
        seed=None if seed == -1 else seed,  # Ollama's -1: a random seed
        stop=_stop(opts),
        logprobs=_boolean(body, "logprobs", False) or top > 0,
        top_logprobs=top,
    )
    return params, P._integer(opts, "num_ctx", 1, None, None)


def _fit(
    svc: Service, prompt_len: int, params: SamplingParams, num_ctx: int | None
) -> SamplingParams:
    """``params`` with the tokens to generate, within ``num_ctx`` (at most the server's context):
    Ollama's num_predict -1 (or none) runs to the context's end, as does one past it."""
    context = min(num_ctx or svc.context, svc.context)
    if prompt_len >= context:
        raise P.invalid(
            f"The prompt is {prompt_len} tokens, more than the context of {context} tokens "
            "(options.num_ctx, at most the server's --max-model-len); shorten the "
            "conversation or raise num_ctx.",
            param="messages",
        )
    room = context - prompt_len
    return SamplingParams(**{**params.__dict__, "max_tokens": min(params.max_tokens or room, room)})


def _think(svc: Service, body: dict[str, Any], name: str) -> dict[str, Any]:
    """Template variables for ``think``: ``enable_thinking`` as Qwen3's template reads it."""
    value = body.get("think")
    if value is None:
        return {}
    if not isinstance(value, bool):
        raise P.invalid(
            "Invalid 'think': expected true or false (thinking levels are for gpt-oss models).",
            param="think",
        )
    if value and not svc.reasoning:
        raise APIError(400, f'"{name}" does not support thinking')
    return {"enable_thinking": value}


def _format(svc: Service, body: dict[str, Any]) -> list[Callable]:
    """The logits processor that holds the reply to ``format`` ("json" or a JSON schema)."""
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return []
    if fmt != "json" and not isinstance(fmt, dict):
        raise P.invalid("Invalid 'format': expected \"json\" or a JSON schema.", param="format")
    if importlib.util.find_spec("qwenlm.generation.constrained") is None:
        raise P.invalid("format needs the structured-output support", param="format")
    from qwenlm.generation.constrained import json_processor

    try:
        return [json_processor(svc.model.tokenizer, None if fmt == "json" else fmt)]
    except (QwenlmError, ValueError) as e:
        raise P.invalid(f"Invalid 'format': {getattr(e, 'message', e)}", param="format") from None


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama's messages as the OpenAI-shaped ones :func:`protocol.chat_messages` checks."""
    if not isinstance(raw, list):
        raise P.invalid("Invalid 'messages': expected an array.", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise P.invalid(f"Invalid 'messages[{i}]': expected an object.", param="messages")
        if m.get("images"):
            raise P.invalid(
                f"Invalid 'messages[{i}].images': this model reads text only.", param="images"
            )
        msg = {k: m[k] for k in ("role", "content", "tool_calls") if m.get(k) is not None}
        name = m.get("tool_name", m.get("name"))
        if name is not None:
            msg["name"] = name
        out.append(msg)
    return P.chat_messages({"messages": out})


# -- replies -----------------------------------------------------------------------------------
def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"function": {"name": call.name, "arguments": call.arguments}}


def _stats(job: Job, started: int, out: Output) -> dict[str, Any]:
    total = time.monotonic_ns() - started
    first = job.request.first_token_at
    prompt = int((first - job.request.arrived) * 1e9) if first is not None else total
    return {
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": out.prompt_tokens,
        "prompt_eval_duration": prompt,
        "eval_count": out.completion_tokens,
        "eval_duration": max(total - prompt, 0),
    }


async def _respond(
    request: Request,
    svc: Service,
    name: str,
    job: Job,
    events: asyncio.Queue[Output],
    parsers: list[ChoiceParser],
    *,
    chat: bool,
    stream: bool,
) -> Any:
    """The reply as Ollama writes it: NDJSON parts ending in a ``done`` one, or one object."""
    started = time.monotonic_ns()
    want_logprobs = job.request.config.logprobs
    tok = svc.model.tokenizer

    async def parts() -> AsyncIterator[dict[str, Any]]:
        async for _, thought, content, lps, calls, out in deltas([job], events, parsers):
            part: dict[str, Any] = {"model": name, "created_at": _now()}
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if thought:
                    message["thinking"] = thought
                if calls:
                    message["tool_calls"] = [_tool_call(c) for c in calls]
                part["message"] = message
            else:
                part["response"] = content
                if thought:
                    part["thinking"] = thought
            if want_logprobs and lps:
                part["logprobs"] = chat_logprobs(tok, lps)
            if content or thought or calls or "logprobs" in part:
                yield {**part, "done": False}
            if out.finish_reason is not None:
                last: dict[str, Any] = {"model": name, "created_at": _now()}
                if chat:
                    last["message"] = {"role": "assistant", "content": ""}
                else:
                    last["response"] = ""
                reason = DONE_REASON.get(out.finish_reason, out.finish_reason)
                yield {**last, "done": True, "done_reason": reason, **_stats(job, started, out)}

    if stream:
        return NDJSON(_lines(parts()), [job])
    got = await collect(request, [job], parts())
    return JSONResponse(_joined(got, chat=chat, logprobs=bool(want_logprobs)))


def _joined(got: list[dict[str, Any]], *, chat: bool, logprobs: bool) -> dict[str, Any]:
    """The one object of a reply not streamed: the ``done`` part with every part's text."""
    final = got[-1]
    content = "".join(p["message"]["content"] if chat else p["response"] for p in got)
    thinking = "".join(p.get("message", p).get("thinking", "") for p in got)
    calls = [c for p in got if chat for c in p["message"].get("tool_calls", [])]
    if chat:
        final["message"] = {"role": "assistant", "content": content}
        if thinking:
            final["message"]["thinking"] = thinking
        if calls:
            final["message"]["tool_calls"] = calls
    else:
        final["response"] = content
        if thinking:
            final["thinking"] = thinking
    if logprobs:
        final["logprobs"] = [lp for p in got for lp in p.get("logprobs", [])]
    return final


def _loaded(name: str, chat: bool) -> JSONResponse:
    """Ollama's answer to a request without a prompt: the model is loaded (it always is)."""
    body: dict[str, Any] = {"model": name, "created_at": _now()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return JSONResponse({**body, "done": True, "done_reason": "load"})


# -- endpoints ---------------------------------------------------------------------------------
@dataclass
class _Turn:
    """What /api/chat and /api/generate share: the checked common fields, then the run."""

    request: Request
    svc: Service
    body: dict[str, Any]
    name: str
    stream: bool
    params: SamplingParams
    num_ctx: int | None
    template_kwargs: dict[str, Any]

    @classmethod
    async def read(cls, request: Request) -> _Turn:
        svc: Service = request.app.state.service
        svc.check_available()
        body = await read_json(request, svc.config.max_body_bytes)
        name = _model(svc, body)
        stream = _boolean(body, "stream", True)
        _keep_alive(body)
        params, num_ctx = _options(body)
        return cls(request, svc, body, name, stream, params, num_ctx, _think(svc, body, name))

    async def run(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        chat: bool,
        mode: str = "plain",
        prefix: str = "",
        tools: Sequence[dict[str, Any]] = (),
    ) -> Any:
        """Submit ``prompt`` to the engine and answer as Ollama does."""
        svc = self.svc
        processors = _format(svc, self.body)
        params = _fit(svc, len(prompt), params, self.num_ctx)
        events: asyncio.Queue[Output] = asyncio.Queue()
        job = svc.submit(
            prompt,
            params,
            1,
            "messages" if chat else "prompt",
            events=events,
            processors=processors,
        )
        parsers = svc.parsers(1, prompt, mode, prefix, tools)
        return await _respond(
            self.request, svc, self.name, job, events, parsers, chat=chat, stream=self.stream
        )


async def chat(request: Request) -> Any:
    """``POST /api/chat``."""
    turn = await _Turn.read(request)
    if turn.body.get("messages") in (None, []):
        return _loaded(turn.name, chat=True)
    messages = _messages(turn.body["messages"])
    # Ollama's clients send "tools": [] for none (OpenAI's API refuses an empty list).
    spec = P.tool_spec({"tools": turn.body.get("tools") or None})
    # Template and tokenizer off the event loop (chat_prompt checks the size first).
    prompt, mode, prefix, params = await run_in_threadpool(
        turn.svc.chat_prompt, messages, spec, turn.params, turn.template_kwargs
    )
    tools = spec.tools if spec else ()
    return await turn.run(prompt, params, chat=True, mode=mode, prefix=prefix, tools=tools)


def _fill_in_middle(tokenizer: Any, prefix: str, suffix: str) -> list[int]:
    """Qwen2.5-Coder's fill-in-the-middle prompt; the texts stay text, whatever they hold."""
    if any(t not in tokenizer.special_tokens for t in FIM_TOKENS):
        raise P.invalid(
            "Invalid 'suffix': this model has no fill-in-the-middle tokens.", param="suffix"
        )
    pre, suf, mid = (tokenizer.special_tokens[t] for t in FIM_TOKENS)
    return [pre, *tokenizer.encode(prefix), suf, *tokenizer.encode(suffix), mid]


async def generate(request: Request) -> Any:
    """``POST /api/generate``."""
    turn = await _Turn.read(request)
    svc, body, params = turn.svc, turn.body, turn.params
    prompt, suffix, system = _text(body, "prompt"), _text(body, "suffix"), _text(body, "system")
    raw = _boolean(body, "raw", False)
    if _text(body, "template"):
        raise P.invalid(
            "Invalid 'template': prompts are rendered with the model's own chat template; "
            "leave 'template' out.",
            param="template",
        )
    if body.get("context"):
        raise P.invalid(
            "'context' (deprecated by Ollama) is not supported; send the conversation to "
            "/api/chat instead.",
            param="context",
        )
    if body.get("images"):
        raise P.invalid("Invalid 'images': this model reads text only.", param="images")
    if not prompt and not suffix:
        return _loaded(turn.name, chat=False)
    tok = svc.model.tokenizer
    if (raw or suffix) and system:
        raise P.invalid(
            "Invalid 'system': raw and fill-in-the-middle prompts have no system message.",
            param="system",
        )
    if suffix:
        if raw:
            raise P.invalid("Invalid 'raw': raw prompts take no 'suffix'.", param="raw")
        svc.check_size(len(prompt or "") + len(suffix), "prompt")
        ids = await run_in_threadpool(_fill_in_middle, tok, prompt or "", suffix)
    elif raw:
        special = next((s for s in tok.special_tokens if s in (prompt or "")), None)
        if special is not None:
            raise P.invalid(
                f"Invalid 'prompt': raw prompts are encoded as plain text, and {special} in it "
                "would not become a control token; send messages to /api/chat, use 'suffix' "
                "for fill-in-the-middle, or token ids to /v1/completions.",
                param="prompt",
            )
        svc.check_size(len(prompt or ""), "prompt")
        ids = await run_in_threadpool(tok.encode, prompt or "")
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt or ""})
        ids, _, _, params = await run_in_threadpool(
            svc.chat_prompt, messages, None, params, turn.template_kwargs
        )
    return await turn.run(ids, params, chat=False)


async def _embed(request: Request, svc: Service, body: dict[str, Any], field: str) -> Any:
    """(vectors, token count) for ``body[field]``; Ollama truncates by default."""
    _keep_alive(body)
    _, num_ctx = _options(body)
    truncate = _boolean(body, "truncate", True)
    size = svc.model.config.hidden_size
    if body.get("dimensions") not in (None, size):
        raise P.invalid(
            f"Invalid 'dimensions': this model's embeddings have {size} dimensions and cannot "
            "be shortened; leave 'dimensions' out.",
            param="dimensions",
        )
    items = P.completion_prompts(body, svc.model.config.vocab_size, field)
    ids = embeddings.token_ids(svc, items, field, truncate=truncate, context=num_ctx)
    return await embeddings.embed(request, svc, ids), sum(len(x) for x in ids)


async def embed(request: Request) -> Any:
    """``POST /api/embed``: ``input`` a string or strings."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    name = _model(svc, body)
    started = time.monotonic_ns()
    if body.get("input") in (None, "", []):
        return JSONResponse({"model": name, "embeddings": []})
    vectors, tokens = await _embed(request, svc, body, "input")
    return JSONResponse(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": time.monotonic_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": tokens,
        }
    )


async def embeddings_v0(request: Request) -> Any:
    """``POST /api/embeddings`` (superseded by /api/embed): one ``prompt``, one vector."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    _model(svc, body)
    if _text(body, "prompt") in (None, ""):
        return JSONResponse({"embedding": []})
    vectors, _ = await _embed(request, svc, body, "prompt")
    return JSONResponse({"embedding": vectors[0]})


# -- the model ---------------------------------------------------------------------------------
def _parameter_count(c: Any) -> int:
    """From the config (quantized layers hold no plain parameters to count); biases left out."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = 2 * h * q + 2 * h * kv
    if c.is_moe and c.num_experts:
        mlp = c.num_experts * 3 * h * c.moe_intermediate_size + h * c.num_experts
        mlp += 3 * h * (c.shared_expert_intermediate_size or 0)
    else:
        mlp = 3 * h * c.intermediate_size
    heads = 1 if c.tie_word_embeddings else 2
    return c.num_hidden_layers * (attention + mlp + 2 * h) + h + heads * c.vocab_size * h


def _size_text(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _files(svc: Service) -> list[Path]:
    path = svc.model.path
    if path is None:
        return []
    path = Path(path)
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def _card(svc: Service) -> dict[str, Any]:
    """The fields /api/tags, /api/show and /api/ps share."""
    files = _files(svc)
    stats = [f.stat() for f in files]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime for s in stats), default=svc.created)
    served = _served_spec(svc)
    # The registry's checksum for a registry model, else an id made from the files' stats.
    ident = ";".join(
        f"{f.name}:{s.st_size}:{s.st_mtime_ns}" for f, s in zip(files, stats, strict=True)
    )
    digest = (
        served.sha256 if served else hashlib.sha256(f"{svc.names[0]};{ident}".encode()).hexdigest()
    )
    c = svc.model.config
    return {
        "name": svc.names[0],
        "model": svc.names[0],
        "modified_at": datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z"),
        "size": size,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf" if files and files[0].suffix == ".gguf" else "safetensors",
            "family": c.model_type,
            "families": [c.model_type],
            "parameter_size": _size_text(_parameter_count(c)),
            "quantization_level": svc.model.weight_format,
        },
    }


async def tags(request: Request) -> Any:
    """``GET /api/tags``: the served model."""
    svc: Service = request.app.state.service
    return JSONResponse({"models": [_card(svc)]})


async def ps(request: Request) -> Any:
    """``GET /api/ps``: the served model, loaded until the server stops."""
    svc: Service = request.app.state.service
    card = _card(svc)
    on_gpu = svc.model.device.type != "cpu"
    return JSONResponse(
        {
            "models": [
                {
                    **card,
                    "expires_at": FOREVER,
                    "size_vram": card["size"] if on_gpu else 0,
                    "context_length": svc.context,
                }
            ]
        }
    )


async def show(request: Request) -> Any:
    """``POST /api/show``: details, the chat template, the default parameters."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    _model(svc, body)
    _boolean(body, "verbose", False)  # no large fields to add: the answer is always whole
    card = _card(svc)
    c = svc.model.config
    arch = c.model_type
    defaults = svc.model.generation_config()
    parameters = [
        f"temperature {defaults.temperature:g}",
        f"top_p {defaults.top_p:g}",
        f"top_k {defaults.top_k}",
        f"repeat_penalty {defaults.repetition_penalty:g}",
        f"num_ctx {svc.context}",
        *(f'stop "{svc.model.tokenizer.decode([t])}"' for t in svc.model.tokenizer.stop_token_ids),
    ]
    capabilities = ["completion", "embedding"]
    if svc.tool_mode == "native":
        capabilities.append("tools")
    if svc.reasoning:
        capabilities.append("thinking")
    if all(t in svc.model.tokenizer.special_tokens for t in FIM_TOKENS):
        capabilities.append("insert")
    info = {
        "general.architecture": arch,
        "general.parameter_count": _parameter_count(c),
        f"{arch}.context_length": svc.context,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        f"{arch}.rope.freq_base": c.rope_theta,
        f"{arch}.vocab_size": c.vocab_size,
    }
    return JSONResponse(
        {
            "modelfile": f"# served by qwenlm, which has no Modelfile\nFROM {card['name']}\n",
            "parameters": "\n".join(parameters),
            "template": svc.model.template.source,
            "details": card["details"],
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": card["modified_at"],
        }
    )


async def version(request: Request) -> Any:
    """``GET /api/version``."""
    return JSONResponse({"version": OLLAMA_VERSION})


async def pull(request: Request) -> Any:
    """``POST /api/pull``: fetch a registry model into the cache, with Ollama's progress lines.

    The server keeps serving its model; a pulled one is served by starting ``qwenlm serve``
    with it. A pull goes on to the end if the client leaves (a later pull finds it done)."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    name = body.get("model", body.get("name"))
    if not isinstance(name, str) or not name:
        raise APIError(400, "model is required")
    stream = _boolean(body, "stream", True)
    _boolean(body, "insecure", False)  # no effect: every pull is checked against its sha256
    spec = _spec(name)
    if spec is None:
        known = ", ".join(sorted(registry.MODELS))
        raise APIError(404, f"pull model manifest: {name} is not in qwenlm's registry ({known})")
    loop = asyncio.get_running_loop()
    progress: asyncio.Queue[int | None] = asyncio.Queue()
    task = loop.run_in_executor(
        None,
        functools.partial(
            registry.pull,
            spec.name,
            cache_dir=svc.config.cache_dir,
            progress=False,
            on_progress=lambda done, _: loop.call_soon_threadsafe(progress.put_nowait, done),
        ),
    )
    task.add_done_callback(lambda _: progress.put_nowait(None))
    layer = {"status": f"pulling {spec.sha256[:12]}", "digest": f"sha256:{spec.sha256}"}

    async def parts() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        while (done := await progress.get()) is not None:
            yield {**layer, "total": spec.size, "completed": done}
        try:
            task.result()
        except Exception as e:  # the kind only: messages may hold local paths
            log.error("pull of %s failed: %s", spec.name, type(e).__name__)
            raise APIError(
                500,
                f"pulling {spec.name} failed ({type(e).__name__}); `qwenlm pull {spec.name}` "
                "on the server shows why",
            ) from None
        yield {**layer, "total": spec.size, "completed": spec.size}
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            yield {"status": status}

    if stream:
        return NDJSON(_lines(parts()), [])
    async for _ in parts():
        pass
    return JSONResponse({"status": "success"})
