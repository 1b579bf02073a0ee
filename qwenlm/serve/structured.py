"""Structured outputs on the wire: which grammar a request asks for, checked field by field.

Four ways to ask, at most one per request: OpenAI's ``response_format`` (``json_object``, or
``json_schema`` with ``name``, ``schema``, ``strict``), vLLM's ``structured_outputs`` object
(``json``, ``json_object``, ``regex``, ``choice`` or ``grammar``), vLLM's older ``guided_json``
/ ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` fields, and a forced tool call
(``tool_choice`` ``required`` or a named function), whose arguments must then validate against
the tool's ``parameters``. The grammar is compiled off the event loop and enforced by
:mod:`qwenlm.generation.constrained`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from qwenlm.generation.config import LogitsProcessor
from qwenlm.generation.constrained import ConstraintError, Grammar, processor
from qwenlm.serve import protocol as P
from qwenlm.serve.protocol import APIError, ToolSpec
from qwenlm.tokenizer import Tokenizer

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """The grammar a request asked for, and the field that asked (for error messages)."""

    grammar: Grammar
    param: str


def _type_error(param: str, expected: str) -> APIError:
    return P.invalid(f"Invalid type for '{param}': expected {expected}.", param=param)


def _schema(value: Any, param: str) -> dict[str, Any]:
    """A JSON schema given as an object, or as a string holding one (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise P.invalid(f"Invalid '{param}': the string is not valid JSON.", param) from None
    if not isinstance(value, dict):
        raise _type_error(param, "a JSON schema object")
    return value


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise _type_error(param, "a non-empty string")
    return value


def _choices(value: Any, param: str) -> Grammar:
    if (
        not isinstance(value, list)
        or not value
        or any(not isinstance(c, str) or not c for c in value)
    ):
        raise _type_error(param, "a non-empty array of non-empty strings")
    return Grammar.choice(value)


def _response_format(value: Any) -> Constraint | None:
    if not isinstance(value, dict):
        raise _type_error("response_format", "an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(Grammar.json(None), "response_format")
    if kind != "json_schema":
        raise P.invalid(
            "Invalid value for 'response_format.type': expected 'text', 'json_object' or "
            "'json_schema'.",
            param="response_format.type",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise P.invalid(
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
        )
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise P.invalid(
            "Missing required parameter: 'response_format.json_schema.name'.",
            param="response_format.json_schema.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _type_error("response_format.json_schema.strict", "a boolean")
    param = "response_format.json_schema.schema"
    # No schema: any JSON value. The schema is enforced with or without `strict`.
    schema = _schema(spec["schema"], param) if spec.get("schema") is not None else {}
    return Constraint(Grammar.json(schema), param)


def _structured_outputs(value: Any) -> Constraint:
    if not isinstance(value, dict):
        raise _type_error("structured_outputs", "an object")
    unknown = sorted(set(value) - set(STRUCTURED_KEYS))
    if unknown:
        raise P.invalid(
            f"Invalid 'structured_outputs': unsupported key '{unknown[0]}' (this server takes "
            f"one of {', '.join(STRUCTURED_KEYS)}).",
            param=f"structured_outputs.{unknown[0]}",
        )
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise P.invalid(
            f"Invalid 'structured_outputs': give exactly one of {', '.join(STRUCTURED_KEYS)}.",
            param="structured_outputs",
        )
    return _one(given[0], value[given[0]], f"structured_outputs.{given[0]}")


def _one(kind: str, value: Any, param: str) -> Constraint:
    if kind == "json":
        return Constraint(Grammar.json(_schema(value, param)), param)
    if kind == "json_object":
        if value is not True:
            raise _type_error(param, "true")
        return Constraint(Grammar.json(None), param)
    if kind == "regex":
        return Constraint(Grammar.regex(_string(value, param)), param)
    if kind == "choice":
        return Constraint(_choices(value, param), param)
    return Constraint(Grammar.grammar(_string(value, param)), param)


def tool_call_grammar(spec: ToolSpec) -> Grammar:
    """What follows the tool-call opening the server writes for the model (app.chat_prompt):
    after ``<tool_call>\\n`` a ``{"name", "arguments"}`` object naming an offered tool; after
    a named function's ``... "arguments": `` its arguments and the closing brace."""

    def parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
        schema = tool["function"].get("parameters") or {}
        return schema if schema else {"type": "object", "properties": {}}

    if spec.choice == "function":
        tool = next(t for t in spec.tools if t["function"]["name"] == spec.function)
        return Grammar.json(parameters(tool), suffix="}")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in spec.tools
    ]
    return Grammar.json(calls[0] if len(calls) == 1 else {"anyOf": calls})


def constraint(
    body: Mapping[str, Any], *, spec: ToolSpec | None = None, tool_mode: str = "plain"
) -> Constraint | None:
    """The constraint a (chat) completion request asks for, or None. ``tool_mode`` is the
    reply mode of the prompt (``native`` forces tool calls through the chat template)."""
    found: list[Constraint] = []
    if body.get("response_format") is not None:
        c = _response_format(body["response_format"])
        if c is not None:
            found.append(c)
    if body.get("structured_outputs") is not None:
        found.append(_structured_outputs(body["structured_outputs"]))
    for name in GUIDED:
        if body.get(name) is not None:
            found.append(_one(name.removeprefix("guided_"), body[name], name))
    if spec is not None and spec.choice in ("required", "function") and tool_mode == "native":
        if found:
            raise P.invalid(
                f"'{found[0].param.split('.')[0]}' cannot be combined with a forced tool call "
                "('tool_choice' required or a named function).",
                param="tool_choice",
            )
        found.append(Constraint(tool_call_grammar(spec), "tools"))
    if len(found) > 1:
        raise P.invalid(
            f"Give one output constraint: '{found[0].param.split('.')[0]}' and "
            f"'{found[1].param.split('.')[0]}' were both set.",
            param=found[1].param.split(".")[0],
        )
    if found and body.get("ignore_eos"):
        raise P.invalid(
            "'ignore_eos' cannot be combined with an output constraint: the output ends where "
            "its grammar ends.",
            param="ignore_eos",
        )
    return found[0] if found else None


async def processors(
    tokenizer: Tokenizer, c: Constraint | None, count: int
) -> list[Sequence[LogitsProcessor]]:
    """``count`` fresh processor lists (one per engine request) for ``c``; compiling runs on
    a worker thread (the first request builds the vocabulary: seconds). Bad grammars are 400s."""
    if c is None:
        return [() for _ in range(count)]

    def build() -> list[Sequence[LogitsProcessor]]:
        return [(processor(tokenizer, c.grammar),) for _ in range(count)]

    try:
        return await anyio.to_thread.run_sync(build)
    except ConstraintError as e:
        if "llguidance" in e.message:  # the server lacks the library: say how to add it
            raise P.invalid(
                f"Structured outputs are not available on this server: {e}.",
                param=c.param,
                code="structured_outputs_unavailable",
            ) from None
        raise P.invalid(f"Invalid '{c.param}': {e.message}.", param=c.param) from None
