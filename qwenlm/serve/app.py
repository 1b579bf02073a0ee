"""The HTTP server: OpenAI's /v1 API, Ollama's /api, /health, /metrics and the web chat page.

Streaming and non-streaming replies come from one generator of per-choice deltas
(:func:`~qwenlm.serve.replies.deltas`); the non-streaming reply collects it. Ollama's routes
live in :mod:`~qwenlm.serve.ollama`, embeddings in :mod:`~qwenlm.serve.embeddings`. The whole
app sits inside :class:`~qwenlm.serve.http.Guard` (the API key on every route, errors in
OpenAI's shape or Ollama's, no tracebacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from qwenlm.errors import GenerationError, QwenlmError
from qwenlm.generation import scheduler as engine
from qwenlm.generation.config import GenerationConfig, LogitsProcessor
from qwenlm.generation.engine import PREFILL_CHUNK, SMALL_SEGMENT
from qwenlm.generation.sampling import TokenLogprob
from qwenlm.generation.scheduler import EngineFailed, Output, QueueFull, Scheduler, ShuttingDown
from qwenlm.serve import embeddings, ollama, reasoning, scoring, structured
from qwenlm.serve import protocol as P
from qwenlm.serve.adapters import Adapters, load_lora_adapter, unload_lora_adapter
from qwenlm.serve.functions import REACT_STOP, ReplyParser, react_conversation, template_has_tools
from qwenlm.serve.http import (
    SSE,
    Guard,
    Job,
    collect,
    error_response,
    internal_error,
    read_json,
    sse_event,
)
from qwenlm.serve.protocol import APIError, SamplingParams
from qwenlm.serve.replies import ChoiceParser, chat_logprobs, deltas, token_text

if TYPE_CHECKING:
    from qwenlm.api import Qwen
    from qwenlm.lora import Adapter

STATIC = Path(__file__).parent / "static"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass
class ServeConfig:
    """Server settings (``qwenlm serve --help`` documents each)."""

    api_key: str | None = None
    model_names: Sequence[str] = ()  # ids the model answers to; the first is listed
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float = 600.0
    max_num_seqs: int = 16
    max_queue: int = 64
    prefix_cache_tokens: int = 16384
    prefill_chunk: int = PREFILL_CHUNK  # prompt pieces; other values change results slightly
    max_model_len: int | None = None  # default: the model's context length
    tool_prompt: str = "auto"  # auto | native | react
    reasoning_parser: str = "auto"  # auto | think | none (deepseek_r1, qwen3: think)
    cors_origins: Sequence[str] = field(default_factory=tuple)
    cache_dir: str | None = None  # where /api/pull puts models (default: the registry's)
    allowed_hosts: Sequence[str] = ()  # Host names answered besides loopback; "*": any
    health_requires_key: bool = False  # else /health answers without the key (for probes)
    stall_timeout: float = 300.0  # a busy engine without a finished step this long is wedged
    shutdown_timeout: float = 10.0  # seconds running requests get after SIGTERM
    lora: Mapping[str, str] = field(default_factory=dict)  # adapter name -> PEFT folder
    enable_lora: bool = False  # load / unload adapters at run time
    max_loras: int = 8


# -- the model-facing part ---------------------------------------------------------------------
class Service:
    """The model, its scheduler and the request handling that needs both."""

    def __init__(self, model: Qwen, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.names = list(config.model_names) or [model.name or "qwenlm"]
        self.context = min(
            model.config.max_position_embeddings,
            config.max_model_len or model.config.max_position_embeddings,
        )
        if config.prefill_chunk <= SMALL_SEGMENT:
            raise ValueError(f"prefill_chunk must be above {SMALL_SEGMENT}")
        model.engine.prefill_chunk = config.prefill_chunk
        self.scheduler = Scheduler(
            model.engine,
            model.tokenizer,
            max_num_seqs=config.max_num_seqs,
            max_queue=config.max_queue,
            prefix_cache_tokens=config.prefix_cache_tokens,
        )
        self.tool_mode = config.tool_prompt
        if self.tool_mode == "auto":
            self.tool_mode = "native" if template_has_tools(model.template.source) else "react"
        self.reasoning = reasoning.parser_enabled(config.reasoning_parser, model.template.source)
        self.created = int(time.time())
        self.http: dict[int, int] = {}  # status -> count, for /metrics (the Guard's)
        # A token holds at most this many bytes of text (so at least as many characters):
        # text longer than context * this cannot fit, and is refused before tokenizing.
        tok = model.tokenizer
        self.max_token_bytes = max(
            len(tok.id_to_bytes(i)) for i in range(tok.vocab_size) if not tok.is_special(i)
        )
        if tok.normalization:  # composing can shrink text up to 3 code points into one
            self.max_token_bytes *= 3
        self.adapters = Adapters(
            model, self.names, config.lora, enabled=config.enable_lora, limit=config.max_loras
        )

    def unavailable(self) -> str | None:
        """Why no request can be served now (the engine died, hangs, or the server is
        shutting down), or None."""
        s = self.scheduler
        if not s.alive:
            return "the engine stopped after an internal error; the server must be restarted"
        if s.stalled_for > self.config.stall_timeout:
            return f"the engine has made no progress for {s.stalled_for:.0f} s"
        if s.draining:
            return "the server is shutting down"
        return None

    def check_available(self) -> None:
        """503 (OpenAI's error) while :meth:`unavailable`."""
        why = self.unavailable()
        if why is not None:
            raise _unavailable(why)

    def check_size(self, chars: int, param: str) -> None:
        """A cheap 400 for text that cannot fit the context, before any template or tokenizer
        runs on it (a 5 MB message would otherwise take a worker for seconds)."""
        if chars > self.context * self.max_token_bytes:
            raise P.invalid(
                f"This model's maximum context length is {self.context} tokens. However, your "
                f"{param} hold {chars} characters, more than that many tokens can hold. "
                f"Please reduce the length of the {param}.",
                param=param,
                code="context_length_exceeded",
            )

    def check_model(self, name: str) -> Adapter | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); else a 404."""
        if name in self.names:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            raise APIError(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return adapter

    def model_id(self, name: str) -> str:
        """The id replies carry: the adapter's name, or the base model's listed name."""
        return name if name in self.adapters.loaded else self.names[0]

    def generation_config(self, params: SamplingParams, max_new_tokens: int) -> GenerationConfig:
        try:
            return self.model.generation_config(
                max_new_tokens=max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                repetition_penalty=params.repetition_penalty,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                logit_bias=params.logit_bias or None,
                seed=params.seed,
                stop=params.stop,
                ignore_eos=params.ignore_eos,
                logprobs=params.logprobs,
                top_logprobs=params.top_logprobs,
            )
        except QwenlmError as e:
            raise P.invalid(e.message) from None

    def budget(self, prompt_len: int, params: SamplingParams, param: str) -> int:
        """How many tokens may be generated; a prompt that does not fit is OpenAI's 400."""
        want = params.max_tokens if params.max_tokens is not None else 0
        if prompt_len + want > self.context or prompt_len >= self.context:
            extra = f", {want} in the completion" if want else ""
            raise P.invalid(
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {prompt_len + want} tokens ({prompt_len} in the {param}{extra}). "
                f"Please reduce the length of the {param} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        return params.max_tokens or (self.context - prompt_len)

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        n: int,
        param: str,
        *,
        events: asyncio.Queue[Output] | None = None,
        offset: int = 0,
        processors: Sequence[LogitsProcessor] = (),
        prompt_logprobs: int | None = None,
        generate: bool = True,
        adapter: Adapter | None = None,
    ) -> Job:
        limit = self.budget(len(prompt), params, param)
        if n > self.config.max_num_seqs:
            raise APIError(
                400,
                f"Invalid 'n': this server runs at most {self.config.max_num_seqs} sequences "
                "at once.",
                param="n",
            )
        events = events if events is not None else asyncio.Queue()
        # The HTTP side waits past the engine's own timeout only as long as a slow step may take.
        deadline = time.monotonic() + self.config.request_timeout + self.config.stall_timeout
        loop = asyncio.get_running_loop()
        config = self.generation_config(params, limit)
        if processors:
            config = config.replace(logits_processors=tuple(processors))
        request = engine.Request(
            prompt,
            config,
            lambda out: loop.call_soon_threadsafe(events.put_nowait, out),
            n=n,
            timeout=self.config.request_timeout,
            offset=offset,
            prompt_logprobs=prompt_logprobs,
            generate=generate,
            adapter=adapter,
        )
        try:
            self.scheduler.submit(request)
        except QueueFull:
            raise APIError(
                503,
                "The server is overloaded: too many requests are waiting. Retry shortly.",
                type="server_error",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            ) from None
        except (EngineFailed, ShuttingDown) as e:
            raise _unavailable(e.message) from None
        except GenerationError as e:
            raise P.invalid(e.message, param=param) from None
        return Job(request, events, deadline)

    # -- chat prompts -------------------------------------------------------------------------
    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        spec: P.ToolSpec | None,
        params: SamplingParams,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[int], str, str, SamplingParams]:
        """(prompt ids, reply mode, forced reply prefix, params) for a chat request;
        ``template_kwargs`` are variables for the chat template (``enable_thinking``)."""
        m = self.model
        kw = template_kwargs or {}
        self.check_size(sum(len(msg["content"]) for msg in messages), "messages")
        try:
            if spec is None or spec.choice == "none":
                return m.encode_chat(messages, **kw), "plain", "", params
            if self.tool_mode == "react":
                head, pad = react_conversation(messages, spec)
                ids = m.encode_chat(head, **kw) + m.tokenizer.encode(pad)
                params = SamplingParams(**{**params.__dict__, "stop": (*params.stop, REACT_STOP)})
                return ids, "react", "", params
            ids = m.encode_chat(messages, tools=spec.tools, **kw)
        except QwenlmError as e:
            raise P.invalid(e.message, param="messages") from None
        prefix = ""
        if spec.choice == "required":
            prefix = "<tool_call>\n"
        elif spec.choice == "function":
            prefix = '<tool_call>\n{"name": ' + json.dumps(spec.function) + ', "arguments": '
        if prefix:
            # The reply's opening is written for the model, as the tokens it would generate.
            ids += m.tokenizer.encode_with_special("<tool_call>") + m.tokenizer.encode(
                prefix[len("<tool_call>") :]
            )
        return ids, "native", prefix, params

    def parsers(
        self,
        n: int,
        prompt: list[int],
        mode: str,
        prefix: str = "",
        tools: Sequence[dict[str, Any]] = (),
    ) -> list[ChoiceParser]:
        """One reply parser per choice; reasoning is split off when the reasoning parser is on
        (``--reasoning-parser``)."""
        opened = self.reasoning and reasoning.prompt_opens_thinking(self.model.tokenizer, prompt)
        return [
            ChoiceParser(
                ReplyParser(mode, prefix, tools),
                reasoning.ThinkSplitter(opened) if self.reasoning else None,
            )
            for _ in range(n)
        ]


def _unavailable(why: str) -> APIError:
    return APIError(503, why[0].upper() + why[1:] + ".", type="server_error", code="unavailable")


async def _sse_events(
    choices: AsyncIterator[dict[str, Any]],
    envelope: Callable[..., dict[str, Any]],
    usage: dict[str, int] | None,
    *,
    opening: Sequence[dict[str, Any]] = (),
    keep: Callable[[dict[str, Any]], bool] = lambda ch: True,
) -> AsyncIterator[bytes]:
    """A streamed completion's SSE body: ``opening`` and each kept choice chunk in its
    ``envelope``, then the usage chunk when ``usage`` is given (counted while streaming, so
    read at the end). :class:`SSE` adds the error frame if generation fails, and ``[DONE]``."""
    extra = {"usage": None} if usage is not None else {}
    for ch in opening:
        yield sse_event(envelope([ch], **extra))
    async for ch in choices:
        if keep(ch):
            yield sse_event(envelope([ch], **extra))
    if usage is not None:
        yield sse_event(envelope([], usage=_usage(usage["prompt"], usage["completion"])))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- endpoints ---------------------------------------------------------------------------------
def _refuse_unsupported(body: dict[str, Any]) -> None:
    P.unsupported(
        body,
        {
            "functions": None,
            "function_call": None,
            "audio": None,
            "prediction": None,
            # vLLM's request-supplied templates: never rendered here (checklist 25); variables
            # for the model's own template come in chat_template_kwargs (checked apart)
            "chat_template": None,
        },
    )


async def chat_completions(request: Request) -> Any:
    svc: Service = request.app.state.service
    svc.check_available()
    body = await read_json(request, svc.config.max_body_bytes)
    name = P.model_name(body)
    messages = await run_in_threadpool(P.chat_messages, body, svc.context)
    spec = P.tool_spec(body)
    params, n = P.sampling_params(body, svc.model.config.vocab_size, chat=True)
    stream, include_usage = P.stream_options(body)
    template_kwargs = reasoning.template_kwargs(body.get("chat_template_kwargs"))
    _refuse_unsupported(body)
    adapter = svc.check_model(name)
    prompt, mode, prefix, params = await run_in_threadpool(
        svc.chat_prompt, messages, spec, params, template_kwargs
    )
    want = structured.constraint(body, spec=spec, tool_mode=mode)
    (procs,) = await structured.processors(svc.model.tokenizer, want, 1)
    events: asyncio.Queue[Output] = asyncio.Queue()
    job = svc.submit(
        prompt, params, n, "messages", events=events, processors=procs, adapter=adapter
    )
    parsers = svc.parsers(n, prompt, mode, prefix, spec.tools if spec else ())
    rid, created, model = "chatcmpl-" + secrets.token_hex(12), int(time.time()), svc.model_id(name)
    tok = svc.model.tokenizer
    usage = {"prompt": len(prompt), "completion": 0}

    async def choices() -> AsyncIterator[dict[str, Any]]:
        async for index, thought, content, lps, calls, out in deltas([job], events, parsers):
            delta: dict[str, Any] = {}
            if thought:
                delta["reasoning_content"] = thought
            if content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = [{"index": k, **c.to_openai()} for k, c in enumerate(calls)]
            if out.finish_reason is not None:
                usage["completion"] += out.completion_tokens
            yield {
                "index": index,
                "delta": delta,
                "logprobs": {"content": chat_logprobs(tok, lps)} if lps else None,
                "finish_reason": out.finish_reason,
            }

    def envelope(chs: list[Any], **extra: Any) -> dict[str, Any]:
        obj = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": chs,
        }
        return {**obj, **extra}

    if stream:
        first = {"role": "assistant", "content": ""}
        opening = [
            {"index": i, "delta": first, "logprobs": None, "finish_reason": None} for i in range(n)
        ]
        events_out = _sse_events(
            choices(),
            envelope,
            usage if include_usage else None,
            opening=opening,
            keep=lambda ch: bool(ch["delta"] or ch["logprobs"] or ch["finish_reason"]),
        )
        return SSE(events_out, [job])

    merged = [
        {"reasoning": [], "content": [], "logprobs": [], "tool_calls": [], "finish_reason": None}
        for _ in range(n)
    ]
    for ch in await collect(request, [job], choices()):
        m = merged[ch["index"]]
        m["reasoning"].append(ch["delta"].get("reasoning_content", ""))
        m["content"].append(ch["delta"].get("content", ""))
        m["tool_calls"] += ch["delta"].get("tool_calls", [])
        if ch["logprobs"]:
            m["logprobs"] += ch["logprobs"]["content"]
        m["finish_reason"] = ch["finish_reason"] or m["finish_reason"]
    result = []
    for i, m in enumerate(merged):
        content = "".join(m["content"])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if svc.reasoning:
            message["reasoning_content"] = "".join(m["reasoning"]) or None
        if m["tool_calls"]:
            message["content"] = content or None
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in m["tool_calls"]
            ]
        result.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": m["logprobs"]} if params.logprobs else None,
                "finish_reason": m["finish_reason"],
            }
        )
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": result,
            "usage": _usage(usage["prompt"], usage["completion"]),
        }
    )


async def completions(request: Request) -> Any:
    svc: Service = request.app.state.service
    svc.check_available()
    body = await read_json(request, svc.config.max_body_bytes)
    name = P.model_name(body)
    prompts = P.completion_prompts(body, svc.model.config.vocab_size)
    fields, echo, generate = scoring.echo_options(body)
    params, n = P.sampling_params(fields, svc.model.config.vocab_size, chat=False)
    stream, include_usage = P.stream_options(body)
    P.unsupported(body, {"suffix": "", "best_of": 1})
    adapter = svc.check_model(name)
    tok = svc.model.tokenizer
    ids = await run_in_threadpool(_prompt_ids, svc, prompts, params, n)
    want = structured.constraint(body)
    procs = await structured.processors(tok, want, len(ids))
    events: asyncio.Queue[Output] = asyncio.Queue()
    jobs: list[Job] = []
    try:
        for k, p in enumerate(ids):
            jobs.append(
                svc.submit(
                    p,
                    params,
                    n,
                    "prompt",
                    events=events,
                    offset=k * n,
                    processors=procs[k],
                    prompt_logprobs=params.top_logprobs if echo and params.logprobs else None,
                    generate=generate,
                    adapter=adapter,
                )
            )
    except APIError:
        for job in jobs:
            job.cancel()
        raise
    parsers = [ChoiceParser(ReplyParser("plain")) for _ in range(len(ids) * n)]
    rid, created, model = "cmpl-" + secrets.token_hex(12), int(time.time()), svc.model_id(name)
    usage = {"prompt": sum(len(p) for p in ids), "completion": 0}
    offsets = [0] * (len(ids) * n)
    echoed: set[int] = set()

    def logprobs(
        index: int, lps: list[TokenLogprob | None] | None, first: int | None = None
    ) -> dict[str, Any] | None:
        if lps is None:
            return None
        tokens, values, tops, text_offset = [], [], [], []
        for lp in lps:
            # None: an echoed prompt's first token, which nothing predicts
            text, _ = token_text(tok, lp.token if lp is not None else first)
            tokens.append(text)
            values.append(lp.logprob if lp is not None else None)
            top: dict[str, float] = {}
            for t, v in lp.top if lp is not None else ():
                # Keyed by text: of tokens that read alike, the likeliest (listed first) stays.
                top.setdefault(token_text(tok, t)[0], v)
            tops.append(top or None)
            text_offset.append(offsets[index])
            offsets[index] += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": text_offset,
        }

    async def choices() -> AsyncIterator[dict[str, Any]]:
        async for index, _, content, lps, _, out in deltas(jobs, events, parsers):
            if out.finish_reason is not None:
                usage["completion"] += out.completion_tokens
            first = None
            if echo and index not in echoed:  # the prompt opens each choice's text
                echoed.add(index)
                prompt = prompts[index // n]
                content = (prompt if isinstance(prompt, str) else tok.decode(prompt)) + content
                first = ids[index // n][0]
                lps = [None, *(out.prompt_logprobs or []), *(lps or [])]
            yield {
                "index": index,
                "text": content,
                "logprobs": logprobs(index, lps, first) if params.logprobs else None,
                "finish_reason": out.finish_reason,
            }

    def envelope(chs: list[Any], **extra: Any) -> dict[str, Any]:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model}
        return {**obj, "choices": chs, **extra}

    if stream:
        return SSE(_sse_events(choices(), envelope, usage if include_usage else None), jobs)

    chunks = await collect(request, jobs, choices())
    merged = _merge_text_choices(chunks, len(ids) * n, bool(params.logprobs))
    return JSONResponse({**envelope(merged), "usage": _usage(usage["prompt"], usage["completion"])})


def _prompt_ids(
    svc: Service, prompts: list[Any], params: SamplingParams, n: int
) -> list[list[int]]:
    """The prompts of a completions request as token ids, each within the budget (run on a
    worker thread: tokenizing must not stall the event loop)."""
    tok = svc.model.tokenizer
    for p in prompts:
        if isinstance(p, str):
            svc.check_size(len(p), "prompt")
    ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
    if any(not p for p in ids):
        raise P.invalid("Invalid 'prompt': the prompt is empty.", param="prompt")
    for p in ids:
        svc.budget(len(p), params, "prompt")
    if len(ids) * n > svc.config.max_num_seqs:
        raise P.invalid(
            f"This server runs at most {svc.config.max_num_seqs} sequences per request "
            "(prompts times n).",
            param="prompt",
        )
    return ids


def _merge_text_choices(
    chunks: list[dict[str, Any]], count: int, with_logprobs: bool
) -> list[dict[str, Any]]:
    """``count`` text-completion choices from their streamed chunks (text and logprobs joined)."""
    merged: list[dict[str, Any]] = [
        {"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(count)
    ]
    for ch in chunks:
        m = merged[ch["index"]]
        m["text"] += ch["text"]
        m["finish_reason"] = ch["finish_reason"] or m["finish_reason"]
        if ch["logprobs"]:
            if m["logprobs"] is None:
                m["logprobs"] = ch["logprobs"]
            else:
                for k in m["logprobs"]:
                    m["logprobs"][k] += ch["logprobs"][k]
    if with_logprobs:
        for m in merged:
            m["logprobs"] = m["logprobs"] or {
                "tokens": [],
                "token_logprobs": [],
                "top_logprobs": [],
                "text_offset": [],
            }
    return merged


async def list_models(request: Request) -> Any:
    svc: Service = request.app.state.service
    names = svc.names[:1] + list(svc.adapters.loaded)
    return JSONResponse({"object": "list", "data": [_model_card(svc, n) for n in names]})


async def get_model(request: Request) -> Any:
    svc: Service = request.app.state.service
    name = request.path_params["model"]
    svc.check_model(name)
    return JSONResponse(_model_card(svc, name))


def _model_card(svc: Service, name: str) -> dict[str, Any]:
    card = {
        "id": name,
        "object": "model",
        "created": svc.created,
        "owned_by": "qwenlm",
        "max_model_len": svc.context,
    }
    if name in svc.adapters.loaded:
        card["parent"] = svc.names[0]  # a LoRA adapter on the base model, as vLLM lists them
    return card


async def health(request: Request) -> Any:
    svc: Service = request.app.state.service
    s = svc.scheduler
    why = svc.unavailable()
    if why is not None:
        return JSONResponse({"status": "error", "reason": why}, status_code=503)
    return JSONResponse({"status": "ok", "running": s.running, "waiting": s.waiting})


async def metrics(request: Request) -> Any:
    svc: Service = request.app.state.service
    s, m = svc.scheduler, svc.scheduler.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP qwenlm_{name} {help}")
        lines.append(f"# TYPE qwenlm_{name} {kind}")
        lines.extend(f"qwenlm_{name}{labels} {value:g}" for labels, value in samples)

    metric("requests_running", "gauge", "Requests being prefilled or decoded.", [("", s.running)])
    metric("requests_waiting", "gauge", "Requests queued for a slot.", [("", s.waiting)])
    metric(
        "requests_total",
        "counter",
        "Finished generation requests by outcome.",
        [(f'{{outcome="{k}"}}', v) for k, v in sorted(m.requests.items())] or [("", 0)],
    )
    metric(
        "http_responses_total",
        "counter",
        "HTTP responses by status code.",
        [(f'{{code="{k}"}}', v) for k, v in sorted(svc.http.items())] or [("", 0)],
    )
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", m.prompt_tokens)])
    metric(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens served from the prefix cache instead of prefilled.",
        [("", m.prefix_cached_tokens)],
    )
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
    metric("decode_steps_total", "counter", "Batched decode forwards.", [("", m.decode_steps)])
    metric(
        "time_to_first_token_seconds",
        "summary",
        "Arrival to first sampled token.",
        [("_sum", m.ttft_sum), ("_count", m.ttft_count)],
    )
    metric("engine_errors_total", "counter", "Failed engine steps.", [("", m.engine_errors)])
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def index(request: Request) -> Any:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})


async def static(request: Request) -> Any:
    name = request.path_params["name"]
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    if name not in files:  # only the files that ship; no path is ever built from the URL
        raise APIError(404, "Not found.", code="not_found")
    return FileResponse(files[name], headers={"Content-Security-Policy": PAGE_CSP})


def _endpoint(fn: Callable) -> Callable:
    """Every error of a handler becomes a JSON response (OpenAI's shape, Ollama's on /api/)."""

    async def wrapped(request: Request) -> Any:
        try:
            return await fn(request)
        except APIError as e:
            return error_response(e, request.url.path)

    wrapped.__name__ = fn.__name__
    return wrapped


async def _not_found(request: Request, exc: Exception) -> Response:
    code = getattr(exc, "status_code", 404)
    path = request.url.path
    if code == 405:
        err = APIError(405, "Method not allowed.", code="method_not_allowed")
    else:
        err = APIError(404, f"Unknown route {path[:100]}.", code="not_found")
    return error_response(err, path)


async def _internal(request: Request, exc: Exception) -> Response:
    return error_response(internal_error())


def create_app(model: Qwen, config: ServeConfig | None = None) -> Guard:
    """The ASGI application serving ``model`` (a :class:`qwenlm.Qwen`)."""
    config = config or ServeConfig()
    service = Service(model, config)
    routes = [
        Route("/", _endpoint(index)),
        Route("/static/{name}", _endpoint(static)),
        Route("/health", _endpoint(health)),
        Route("/metrics", _endpoint(metrics)),
        Route("/v1/models", _endpoint(list_models)),
        Route("/v1/models/{model:path}", _endpoint(get_model)),
        Route("/v1/chat/completions", _endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", _endpoint(completions), methods=["POST"]),
        Route("/v1/embeddings", _endpoint(embeddings.create), methods=["POST"]),
        *ollama.routes(_endpoint),
        Route("/tokenize", _endpoint(scoring.tokenize), methods=["POST"]),
        Route("/detokenize", _endpoint(scoring.detokenize), methods=["POST"]),
        Route("/tokenizer_info", _endpoint(scoring.tokenizer_info)),
        Route("/v1/load_lora_adapter", _endpoint(load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _endpoint(unload_lora_adapter), methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.stop()

    app = Starlette(
        routes=routes,
        # Starlette answers an unexpected error itself (plain text) before the Guard sees it:
        # give it OpenAI's shape; the Guard still logs it.
        exception_handlers={404: _not_found, 405: _not_found, Exception: _internal},
        lifespan=lifespan,
    )
    app.state.service = service
    inner: Any = app
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        inner = CORSMiddleware(
            app,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    guard = Guard(
        inner,
        api_key=config.api_key,
        cors=bool(config.cors_origins),
        state=app.state,
        allowed_hosts=config.allowed_hosts,
        open_paths=() if config.health_requires_key else ("/health",),
    )
    service.http = guard.responses
    return guard
