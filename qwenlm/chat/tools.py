"""Tool calls in Qwen2.5's format, parsed out of model text.

Qwen2.5 chat templates tell the model to answer a tool request with, per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``parse_tool_calls`` splits a reply into its plain content and those calls. It never raises:
a block whose JSON is invalid, or lacks a string ``name``, or whose ``arguments`` is not an
object (or a JSON string holding one), is left in the content as the model wrote it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# A block runs to its closing tag, or to the end of the text (a reply cut by a stop token).
_BLOCK = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL
)


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for. ``id`` is made here (the model writes none)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(8))

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry (``arguments`` as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {
                "name": self.name,
                "arguments": json.dumps(self.arguments, ensure_ascii=False),
            },
        }

    def to_message(self) -> dict[str, Any]:
        """The entry for an assistant message's ``tool_calls``, as the chat template reads it."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _parse_one(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, Mapping):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if args is None:
        args = {}
    if not isinstance(name, str) or not name or not isinstance(args, Mapping):
        return None
    return ToolCall(name, dict(args))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """``(content, calls)``: the reply without its valid ``<tool_call>`` blocks, and the calls.

    Never raises; invalid blocks stay in ``content`` verbatim.
    """
    if not isinstance(text, str):
        return "", []
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = _parse_one(m.group(1))
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        calls.append(call)
        pos = m.end()
    kept.append(text[pos:])
    content = "".join(kept)
    return (content.strip() if calls else content), calls


def function_schema(name: str, description: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A tool definition in the OpenAI / Qwen2.5 template form."""
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": dict(parameters)},
    }
