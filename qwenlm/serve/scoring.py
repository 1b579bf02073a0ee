"""Scoring prompts, as lm-evaluation-harness asks: ``echo`` on /v1/completions, and vLLM's
tokenizer routes.

lm-eval's ``local-completions`` model computes a loglikelihood by sending the context and
continuation as token ids with ``echo: true, logprobs: 1, max_tokens: 1`` (or ``0``) and
summing the continuation's ``token_logprobs`` from the echoed prompt. It tokenizes with the
server's own tokenizer through ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``
(vLLM's routes; lm-eval finds them by itself), so no Hugging Face tokenizer is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from qwenlm.errors import QwenlmError
from qwenlm.serve import protocol as P
from qwenlm.serve.http import read_json

if TYPE_CHECKING:
    from qwenlm.serve.app import Service


def echo_options(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """(the body to read sampling fields from, echo, generate). ``max_tokens: 0`` is allowed
    with ``echo`` (score the prompt only, as OpenAI's legacy completions did)."""
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise P.invalid("Invalid type for 'echo': expected a boolean.", param="echo")
    if body.get("max_tokens") == 0 and not isinstance(body.get("max_tokens"), bool):
        if not echo:
            raise P.invalid(
                "Invalid 'max_tokens': 0 is only allowed with 'echo': true (scoring the prompt).",
                param="max_tokens",
            )
        return {k: v for k, v in body.items() if k != "max_tokens"}, True, False
    return dict(body), bool(echo), True


async def tokenize(request: Request) -> Any:
    """vLLM's ``POST /tokenize``: ``prompt`` (a string, encoded as /v1/completions encodes
    it) or ``messages`` (through the chat template) -> ``{"count", "max_model_len", "tokens"}``."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    if body.get("model") is not None:
        svc.check_model(P.model_name(body))
    special = body.get("add_special_tokens", False)
    if not isinstance(special, bool):
        raise P.invalid(
            "Invalid type for 'add_special_tokens': expected a boolean.", "add_special_tokens"
        )
    if "messages" in body:
        try:
            ids = svc.model.encode_chat(P.chat_messages(body))
        except QwenlmError as e:
            raise P.invalid(e.message, param="messages") from None
    elif isinstance(body.get("prompt"), str):
        # Qwen's tokenizer adds no BOS: add_special_tokens changes nothing.
        ids = svc.model.tokenizer.encode(body["prompt"])
    else:
        raise P.invalid("Missing required parameter: 'prompt' (a string) or 'messages'.", "prompt")
    return JSONResponse({"count": len(ids), "max_model_len": svc.context, "tokens": ids})


async def detokenize(request: Request) -> Any:
    """vLLM's ``POST /detokenize``: ``tokens`` -> ``{"prompt": text}``."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    if body.get("model") is not None:
        svc.check_model(P.model_name(body))
    ids = body.get("tokens")
    vocab = svc.model.config.vocab_size
    if not isinstance(ids, list) or any(
        isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids
    ):
        raise P.invalid(
            f"Invalid 'tokens': expected an array of token ids in 0..{vocab - 1}.", "tokens"
        )
    return JSONResponse({"prompt": svc.model.tokenizer.decode(ids)})


async def tokenizer_info(request: Request) -> Any:
    """vLLM's ``GET /tokenizer_info``: the special tokens and the chat template."""
    svc: Service = request.app.state.service
    tok = svc.model.tokenizer

    def name(token: int | None) -> str | None:
        return None if token is None else tok.decode([token])

    return JSONResponse(
        {
            "tokenizer_class": "qwenlm",
            "eos_token": name(tok.eos_token_id),
            "bos_token": name(tok.bos_token_id),
            "pad_token": name(tok.pad_token_id),
            "model_max_length": svc.context,
            "chat_template": svc.model.template.source,
        }
    )
