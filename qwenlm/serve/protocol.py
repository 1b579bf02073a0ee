"""The OpenAI wire format: request bodies checked field by field, errors in OpenAI's shape.

Every check names the offending parameter the way OpenAI does (``messages[1].role``), so a
client sees which field to fix. Nothing here knows about the model beyond its name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwenlm.chat.content import NonTextPart, join_text_parts
from qwenlm.errors import json_type

MAX_STOP = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "user", "assistant", "tool")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_failed() -> APIError:
    """503: the engine's loop stopped on an internal error and serves nothing more."""
    return APIError(
        503,
        "The engine stopped after an internal error; the server must be restarted.",
        type="server_error",
        code="engine_failed",
    )


# -- parsing the body --------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; NaN, Infinity, bad UTF-8, lone surrogates are errors."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("The request body is not valid UTF-8.", code="invalid_json") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        why = str(e) if "not valid JSON" in str(e) or "out of range" in str(e) else None
        message = "We could not parse the JSON body of your request."
        if why:
            message += f" ({why}.)"
        else:
            message += " (The API expects a JSON object; what was sent was not valid JSON.)"
        raise invalid(message, code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(
            f"The request body must be a JSON object, but got {json_type(body)}.",
            code="invalid_type",
        )
    _check_strings(body, "")
    return body


def _check_strings(value: Any, path: str) -> None:
    # A lone surrogate ("\ud800") parses in Python but is no Unicode text: refuse it early.
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise invalid(
                f"Invalid '{path or 'body'}': the string holds a lone UTF-16 surrogate, "
                "which is not valid Unicode.",
                param=path or None,
                code="invalid_value",
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, path)
            _check_strings(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{path}[{i}]")


# -- field checks ------------------------------------------------------------------------------
def _type_error(name: str, expected: str, value: Any) -> APIError:
    return invalid(
        f"Invalid type for '{name}': expected {expected}, but got {json_type(value)} instead.",
        param=name,
        code="invalid_type",
    )


def _number(
    body: Mapping[str, Any], name: str, lo: float, hi: float, default: float | None
) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    if value < lo:
        raise invalid(
            f"Invalid '{name}': number below minimum value. Expected a value >= {lo:g}, "
            f"but got {value:g} instead.",
            param=name,
            code="decimal_below_min_value",
        )
    if value > hi:
        raise invalid(
            f"Invalid '{name}': number above maximum value. Expected a value <= {hi:g}, "
            f"but got {value:g} instead.",
            param=name,
            code="decimal_above_max_value",
        )
    return float(value)


def _integer(
    body: Mapping[str, Any], name: str, lo: int, hi: int | None, default: int | None
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if value < lo:
        raise invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {lo}, "
            f"but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if hi is not None and value > hi:
        raise invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {hi}, "
            f"but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _boolean(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or any(not isinstance(s, str) for s in value):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP:
        raise invalid(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, "
            f"but got an array with length {len(value)} instead.",
            param="stop",
            code="array_above_max_length",
        )
    if any(not s for s in value):
        raise invalid("Invalid 'stop': stop strings must not be empty.", param="stop")
    return tuple(value)


def _logit_bias(body: Mapping[str, Any], vocab_size: int) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _type_error("logit_bias", "an object", value)
    out = {}
    for k, v in value.items():
        try:
            token = int(k)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise invalid(
                f"Invalid 'logit_bias': {k!r} is not a token id in 0..{vocab_size - 1}.",
                param="logit_bias",
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise invalid(
                f"Invalid 'logit_bias[{k}]': expected a number in [-100, 100].",
                param="logit_bias",
            )
        out[token] = float(v)
    return out


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the engine. ``None`` fields take the model's defaults."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False


def sampling_params(
    body: Mapping[str, Any], vocab_size: int, *, chat: bool, max_n: int = MAX_N
) -> tuple[SamplingParams, int]:
    """The sampling fields of a (chat) completion request, checked; returns (params, n)."""
    n = _integer(body, "n", 1, max_n, 1)
    max_tokens = _integer(body, "max_tokens", 1, None, None)
    if chat:
        mct = _integer(body, "max_completion_tokens", 1, None, None)
        max_tokens = mct if mct is not None else max_tokens
        logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not logprobs:
            raise invalid(
                "Invalid 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' "
                "is given.",
                param="top_logprobs",
            )
        top = top or 0
    else:
        # Completions: `logprobs` is how many top alternatives to return per token (up to 20
        # as vLLM allows; OpenAI's limit is 5).
        lp = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
        logprobs, top = lp is not None, lp or 0
    seed = _integer(body, "seed", -(2**63), 2**63 - 1, None)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, None),
        top_p=_number(body, "top_p", 0.0, 1.0, None),
        top_k=_integer(body, "top_k", -1, None, None),
        min_p=_number(body, "min_p", 0.0, 1.0, None),
        repetition_penalty=_number(body, "repetition_penalty", 0.01, 10.0, None),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        seed=seed,
        stop=_stop(body),
        logprobs=logprobs,
        top_logprobs=top,
        logit_bias=_logit_bias(body, vocab_size),
        ignore_eos=_boolean(body, "ignore_eos"),
    )
    if params.top_p == 0.0:
        params = SamplingParams(**{**params.__dict__, "top_p": 1e-9})
    if params.top_k == -1:  # vLLM's spelling of "off"
        params = SamplingParams(**{**params.__dict__, "top_k": 0})
    return params, n


def stream_options(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    if not stream:
        raise invalid(
            "Invalid 'stream_options': only allowed when 'stream' is true.",
            param="stream_options",
        )
    return stream, _boolean(opts, "include_usage")


def model_name(body: Mapping[str, Any]) -> str:
    value = body.get("model")
    if value is None:
        raise invalid("You must provide a model parameter.", param="model", code="missing_model")
    if not isinstance(value, str):
        raise _type_error("model", "a string", value)
    return value


def unsupported(body: Mapping[str, Any], names: Mapping[str, Any]) -> None:
    """Refuse parameters the server cannot honour instead of silently ignoring them."""
    for name, allowed in names.items():
        value = body.get(name)
        if value is not None and value != allowed and not (callable(allowed) and allowed(value)):
            raise invalid(f"'{name}' is not supported by this server.", param=name)


# -- chat messages and tools -------------------------------------------------------------------
def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        try:
            return join_text_parts(content)
        except NonTextPart as e:
            where = f"{param}[{e.index}]"
            raise invalid(
                f"Invalid '{where}': only text content parts are supported.", param=where
            ) from None
    raise _type_error(param, "a string or an array of content parts", content)


def _tool_call_in(call: Any, param: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise _type_error(param, "an object", call)
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise invalid(f"Invalid '{param}': expected a function with a name.", param=param)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        # The template writes arguments as JSON; hand it the object the model once wrote.
        try:
            parsed = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            parsed = args
        args = parsed
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def chat_messages(body: Mapping[str, Any], max_messages: int | None = None) -> list[dict[str, Any]]:
    """The conversation as role/content dicts the chat template reads; more than
    ``max_messages`` (each renders to at least one token: the context) is refused before any
    message is looked at."""
    value = body.get("messages")
    if value is None:
        raise invalid("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(value, list):
        raise _type_error("messages", "an array", value)
    if not value:
        raise invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            param="messages",
            code="empty_array",
        )
    if max_messages is not None and len(value) > max_messages:
        raise invalid(
            f"Invalid 'messages': array too long. Expected at most {max_messages} messages "
            f"(the model's context length), but got {len(value)}.",
            param="messages",
            code="array_above_max_length",
        )
    out = []
    for i, m in enumerate(value):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(p, "an object", m)
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise invalid(
                f"Invalid value for '{p}.role': {json.dumps(role)} is not one of "
                f"{', '.join(repr(r) for r in ROLES)}.",
                param=f"{p}.role",
                code="invalid_value",
            )
        msg: dict[str, Any] = {"role": role}
        content = m.get("content")
        calls = m.get("tool_calls")
        if role == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise _type_error(f"{p}.tool_calls", "an array", calls)
            msg["tool_calls"] = [
                _tool_call_in(c, f"{p}.tool_calls[{j}]") for j, c in enumerate(calls)
            ]
            content = "" if content is None else content
        if content is None:
            raise invalid(f"Missing required parameter: '{p}.content'.", param=f"{p}.content")
        msg["content"] = _content_text(content, f"{p}.content")
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        name = m.get("name")
        if isinstance(name, str):
            msg["name"] = name
        out.append(msg)
    return out


@dataclass(frozen=True)
class ToolSpec:
    """Tools offered to the model and how it must use them."""

    tools: list[dict[str, Any]]
    choice: str = "auto"  # auto | none | required | function
    function: str | None = None  # the forced function's name when choice == "function"


def tool_spec(body: Mapping[str, Any]) -> ToolSpec | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise invalid("Invalid 'tool_choice': no 'tools' were given.", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise _type_error("tools", "an array", tools)
    if not tools:  # OpenAI refuses it too: leave 'tools' out instead
        raise invalid(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param="tools",
            code="empty_array",
        )
    names = []
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise invalid(f"Invalid '{p}': only function tools are supported.", param=p)
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"Invalid '{p}.function': expected an object with a name.", param=p)
        params = fn.get("parameters", {})
        if not isinstance(params, dict):
            raise _type_error(f"{p}.function.parameters", "an object", params)
        names.append(fn["name"])
    if choice is None or choice in ("auto", "none", "required"):
        return ToolSpec(tools, choice or "auto")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") == "function" and name in names:
            return ToolSpec(tools, "function", name)
        raise invalid(
            "Invalid 'tool_choice': it must name one of the functions in 'tools'.",
            param="tool_choice",
        )
    raise invalid(
        "Invalid 'tool_choice': expected 'none', 'auto', 'required' or a function.",
        param="tool_choice",
    )


def completion_prompts(
    body: Mapping[str, Any], vocab_size: int, name: str = "prompt"
) -> list[str | list[int]]:
    """``prompt`` of /v1/completions (``input`` of /v1/embeddings: ``name``): a string,
    strings, token ids, or lists of token ids."""
    value = body.get(name)
    if value is None:
        raise invalid(f"Missing required parameter: '{name}'.", param=name)

    def ids(xs: list[Any], param: str) -> list[int]:
        if any(isinstance(t, bool) or not isinstance(t, int) for t in xs):
            raise _type_error(param, "an array of token ids", xs)
        if any(not 0 <= t < vocab_size for t in xs):
            raise invalid(f"Invalid '{param}': token ids must be in 0..{vocab_size - 1}.", param)
        return list(xs)

    if isinstance(value, str):
        prompts: list[str | list[int]] = [value]
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        prompts = [ids(x, f"{name}[{i}]") for i, x in enumerate(value)]
    elif isinstance(value, list) and value:
        prompts = [ids(value, name)]
    else:
        raise _type_error(name, "a string, an array of strings or of token ids", value)
    if any(len(p) == 0 for p in prompts):
        raise invalid(f"Invalid '{name}': the {name} is empty.", param=name)
    return prompts
