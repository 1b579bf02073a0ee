"""``qwenlm serve [MODEL]``: the OpenAI-compatible API and the web chat page."""

from __future__ import annotations

import argparse
import os
import sys

from qwenlm.cli.common import add_model_args, add_parallel_args, load_model
from qwenlm.errors import QwenlmError

API_KEY_ENV = "QWENLM_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/embeddings, /v1/models, /health, /metrics) and Ollama's API "
        "(/api/chat, /api/generate, /api/embed, /api/tags, ...), with a web chat page at /.",
    )
    add_model_args(p, positional=True)
    add_parallel_args(p)
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route (default: ${API_KEY_ENV}; "
        "unset: no key)",
    )
    g.add_argument(
        "--health-requires-key",
        action="store_true",
        help="require the key on /health too (default: /health answers without it, for "
        "load-balancer probes)",
    )
    g.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="answer requests whose Host header names NAME, besides 127.0.0.1, localhost, "
        "[::1] and the --host address (repeatable; any port); '*' answers any name, which "
        "lets web pages reach the server through DNS rebinding (default: those names only)",
    )
    g.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable; default: CORS off)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body accepted; larger is a 413 (default 4 MiB)",
    )
    g = p.add_argument_group("engine")
    g.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="the model id clients send and /v1/models lists (repeatable; the first is "
        "listed; default: the model's name)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=16,
        help="sequences decoded together in the running batch (default 16)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a slot; more get 503 with Retry-After (default 64)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take; then it ends with finish_reason 'length' (default 600)",
    )
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        help="seconds the engine may go without finishing a step while it has work; then "
        "/health and new requests answer 503, and a request waiting past --request-timeout "
        "plus this ends with 504 (default 300)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM or Ctrl-C, seconds running requests get to finish before they end "
        "with an error; new requests get 503 meanwhile (default 10)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        help="context length to allow, prompt plus completion (default: the model's)",
    )
    g.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=16384,
        help="KV-cache positions kept from finished requests to reuse for prompts that share "
        "their prefix; 0 turns it off (default 16384)",
    )
    g.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompts prefill in pieces ending at multiples of this many positions, each "
        "piece alone in its forward pass, and the prefix cache reuses whole pieces: a request "
        "gives the same tokens alone, under load, from the cache and through `qwenlm "
        "generate`. Another value changes results at the rounding level against other "
        "surfaces; above 16 (default 512)",
    )
    g.add_argument(
        "--tool-prompt",
        choices=["auto", "native", "react"],
        default="auto",
        help="how tools reach the model: native (the chat template's tools, Qwen2.5's "
        "<tool_call>), react (the Qwen ReAct prompt) or auto (native when the template "
        "supports tools)",
    )
    g.add_argument(
        "--reasoning-parser",
        choices=["auto", "think", "none", "deepseek_r1", "qwen3"],
        default="auto",
        help="split replies that open with <think> into reasoning_content and content: think "
        "(on; deepseek_r1 and qwen3 are other names for it), none (off) or auto (on when the "
        "chat template mentions <think>, as reasoning models' templates do)",
    )
    g = p.add_argument_group("adapters")
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve the PEFT LoRA adapter in folder PATH beside the base model; requests pick "
        "it with model NAME (repeatable)",
    )
    g.add_argument(
        "--enable-lora",
        action="store_true",
        help="allow loading and unloading adapters at run time (POST /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter); implied by --lora",
    )
    g.add_argument(
        "--max-loras",
        type=int,
        default=8,
        help="adapters held at once (default 8)",
    )
    g = p.add_argument_group("logging")
    g.add_argument("--no-access-log", action="store_true", help="do not log each request")
    g.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default info)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise QwenlmError(
            "qwenlm serve needs starlette and uvicorn",
            hint="pip install 'qwenlm[serve]'",
        ) from None
    from qwenlm.generation.engine import SMALL_SEGMENT
    from qwenlm.serve import WILDCARD_HOSTS, ServeConfig, serve

    for name in ("max_num_seqs", "max_queue", "max_body_bytes", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise QwenlmError(f"--{name.replace('_', '-')} must be positive")
    for name in ("request_timeout", "stall_timeout", "shutdown_timeout"):
        if not getattr(args, name) > 0:
            raise QwenlmError(f"--{name.replace('_', '-')} must be positive")
    if args.prefill_chunk <= SMALL_SEGMENT:
        raise QwenlmError(f"--prefill-chunk must be above {SMALL_SEGMENT}")
    lora = {}
    for spec in args.lora:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise QwenlmError(f"--lora takes NAME=PATH, got {spec!r}")
        if name in lora:
            raise QwenlmError(f"--lora names {name!r} twice")
        lora[name] = path
    if args.max_loras < len(lora):
        raise QwenlmError(f"--max-loras {args.max_loras} is below the {len(lora)} --lora given")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"warning: serving on {args.host} without an API key; anyone who can reach it can "
            f"use it (set --api-key or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    if args.host in WILDCARD_HOSTS and not args.allowed_host:
        print(
            f"note: bound to {args.host}, the server answers only requests addressed to "
            "127.0.0.1 or localhost; add --allowed-host NAME for each name or address clients "
            "use",
            file=sys.stderr,
        )
    model = load_model(args)
    config = ServeConfig(
        api_key=api_key or None,
        model_names=args.served_model_name or [model.name],
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        prefix_cache_tokens=args.prefix_cache_tokens,
        prefill_chunk=args.prefill_chunk,
        max_model_len=args.max_model_len,
        tool_prompt=args.tool_prompt,
        reasoning_parser=args.reasoning_parser,
        cors_origins=args.cors_origin,
        cache_dir=args.cache_dir,
        allowed_hosts=args.allowed_host,
        health_requires_key=args.health_requires_key,
        stall_timeout=args.stall_timeout,
        shutdown_timeout=args.shutdown_timeout,
        lora=lora,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
    )
    print(f"serving {config.model_names[0]} on http://{args.host}:{args.port}", file=sys.stderr)
    serve(
        model,
        host=args.host,
        port=args.port,
        config=config,
        access_log=not args.no_access_log,
        log_level=args.log_level,
    )
    return 0
