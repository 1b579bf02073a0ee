"""Function calling for the server: tools into the prompt, tool calls out of the reply.

Two prompt formats. ``native``: the model's own chat template renders ``tools`` (Qwen2.5's
``<tool_call>`` JSON blocks); the reply streams as content until a ``<tool_call>`` begins, and
what follows is parsed into calls when the reply ends. Small models often write the call as a
bare or fenced JSON object without the tags; a reply that is nothing but such objects, each
naming an offered tool, counts as calls too (so a reply that opens with ``{`` or a code fence
is held back until it ends when tools are offered). ``react``: for templates without tools,
the Qwen repository's ReAct prompt (Thought / Action / Action Input / Observation), with
generation stopped at ``Observation:`` and earlier tool results written back as observations.
A reply whose calls do not parse is returned as content, never as an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from qwenlm.agent.function_calling import loose_tool_calls
from qwenlm.agent.react import action_arguments, parse_action, react_prompt
from qwenlm.agent.tools import Tool, ToolRegistry
from qwenlm.chat.tools import TOOL_CALL_OPEN, ToolCall, parse_tool_calls
from qwenlm.serve.protocol import ToolSpec

REACT_STOP = "Observation:"


def template_has_tools(source: str) -> bool:
    """Whether a chat template renders ``tools`` (Qwen2.5's does; Qwen1's ChatML does not)."""
    return "tools" in source


def _registry(tools: Sequence[dict[str, Any]]) -> ToolRegistry:
    out = []
    for t in tools:
        fn = t["function"]
        out.append(
            Tool(fn["name"], fn.get("description", ""), fn.get("parameters", {}), fn=lambda: "")
        )
    return ToolRegistry(out)


def react_conversation(
    messages: list[dict[str, Any]], spec: ToolSpec
) -> tuple[list[dict[str, Any]], str]:
    """(messages for the template, the assistant's scratchpad to continue) in ReAct form.

    The last user message becomes the ReAct prompt's question; the assistant tool calls and
    tool results after it are replayed as Action / Action Input / Observation steps.
    """
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        return messages, ""
    head = list(messages[:last_user])
    tools = spec.tools
    if spec.choice == "function":
        tools = [t for t in tools if t["function"]["name"] == spec.function]
    question = react_prompt(messages[last_user]["content"], _registry(tools))
    head.append({"role": "user", "content": question})
    pad = ""
    for m in messages[last_user + 1 :]:
        if m["role"] == "assistant":
            pad += m["content"].strip() or "Thought: I should call a tool."
            for call in m.get("tool_calls", [])[:1]:
                fn = call["function"]
                args = fn["arguments"]
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                pad += f"\nAction: {fn['name']}\nAction Input: {args}\n"
        elif m["role"] == "tool":
            pad += f"{REACT_STOP} {m['content']}\nThought:"
    return head, pad


class ReplyParser:
    """Splits one choice's streamed text into content deltas and, at the end, tool calls.

    ``mode`` is ``plain`` (no tools), ``native`` or ``react``. ``prefix`` is text the prompt
    already holds of the reply (a forced ``<tool_call>`` opening), parsed as if generated.
    ``tools`` are the offered tool definitions.
    """

    def __init__(self, mode: str, prefix: str = "", tools: Sequence[dict[str, Any]] = ()) -> None:
        self.mode = mode
        self.held = prefix  # text not yet released as content
        self.in_call = TOOL_CALL_OPEN in prefix
        self.tools = _registry(tools)
        self.released = False  # some content has been shown: no loose JSON call any more

    def feed(self, text: str) -> str:
        """Content that may be shown now."""
        if self.mode == "plain":
            return text
        self.held += text
        if self.mode == "react" or self.in_call:
            return ""
        start = self.held.lstrip()
        if not self.released and (not start or start[0] == "{" or "```".startswith(start[:3])):
            return ""  # could still be a whole-reply JSON call
        at = self.held.find(TOOL_CALL_OPEN)
        if at >= 0:
            self.in_call = True
            out, self.held = self.held[:at], self.held[at:]
            return out
        keep = 0  # the longest tail that could still grow into "<tool_call>"
        for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.held)), 0, -1):
            if self.held.endswith(TOOL_CALL_OPEN[:k]):
                keep = k
                break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        self.released = self.released or bool(out)
        return out

    def finish(self, reason: str) -> tuple[str, list[ToolCall], str]:
        """(remaining content, tool calls, finish reason) once the choice has ended."""
        rest, self.held = self.held, ""
        if self.mode == "plain":
            return rest, [], reason
        if self.mode == "native":
            content, calls = parse_tool_calls(rest)
            if calls:
                return content, calls, "tool_calls"
            if not self.released:
                calls = loose_tool_calls(rest, self.tools.names)
                if calls:
                    return "", calls, "tool_calls"
            return rest, [], reason
        # ReAct: a Final Answer wins; else the last Action is the call.
        final = rest.rfind("Final Answer:")
        action = parse_action(rest)
        if final >= 0 and (action is None or rest.rfind("Action:") < final):
            return rest[final + len("Final Answer:") :].strip(), [], reason
        if action is not None:
            name, raw = action
            args = action_arguments(raw, self.tools.get(name)) if raw else {}
            if isinstance(args, dict):
                thought = rest[: rest.rfind("Action:")].strip()
                return thought, [ToolCall(name, args)], "tool_calls"
        return rest, [], reason
