"""Native function calling: tools declared through the chat template, calls parsed from
Qwen2.5's ``<tool_call>`` blocks, results sent back as ``tool`` messages.

Tool output is data. It enters the conversation as a message's content, which the chat
template escapes (a special-token spelling in it stays text), and calls are parsed only from
what the model generated, never from tool output.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwenlm.agent.tools import Tool, ToolRegistry, ToolResult
from qwenlm.chat.tools import ToolCall, parse_tool_calls

if TYPE_CHECKING:
    from qwenlm.api import Qwen


@dataclass
class AgentStep:
    """One tool call and what came back, or the final answer (``tool`` is None)."""

    text: str  # what the model wrote in this turn (or the step's Thought for ReAct)
    tool: str | None = None
    arguments: Any = None
    observation: str | None = None
    error: bool = False
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class AgentResult:
    answer: str
    steps: list[AgentStep]
    finished: bool  # False when the step limit ended the run before an answer
    transcript: Any = None  # messages (function calling) or the ReAct text

    @property
    def tool_calls(self) -> list[AgentStep]:
        return [s for s in self.steps if s.tool is not None]


_FENCED_JSON = re.compile(r"```(?:json)?\s*\n(.*?)\n\s*```", re.DOTALL)


def loose_tool_calls(text: str, names: Iterable[str]) -> list[ToolCall]:
    """Calls written without the ``<tool_call>`` tags: a reply made only of JSON call objects
    (one object, objects in ```json fences, or one object per line), each naming a known
    tool. Repeated identical calls count once.

    Small models often answer a tool request this way. Only a reply that is nothing but such
    objects counts, so ordinary prose or code never turns into a call.
    """
    known = set(names)
    stripped = text.strip()
    if stripped.startswith("```"):
        bodies = _FENCED_JSON.findall(stripped)
        if _FENCED_JSON.sub("", stripped).strip():
            return []
    else:
        _, whole = parse_tool_calls(f"<tool_call>{stripped}</tool_call>")
        bodies = [stripped] if whole else [line for line in stripped.splitlines() if line.strip()]
    calls: list[ToolCall] = []
    seen = set()
    for body in bodies:
        _, parsed = parse_tool_calls(f"<tool_call>{body}</tool_call>")
        if len(parsed) != 1 or parsed[0].name not in known:
            # a cut-off last line (the reply hit its token limit) is dropped, nothing else
            if body is bodies[-1] and calls and not stripped.startswith("```"):
                break
            return []
        key = json.dumps([parsed[0].name, parsed[0].arguments], sort_keys=True)
        if key not in seen:
            seen.add(key)
            calls.append(parsed[0])
    return calls


def _repeats_a_call(text: str, names: Iterable[str]) -> bool:
    """Whether the last complete line of ``text`` repeats an earlier line of loose JSON calls."""
    lines = [line.strip() for line in text.split("\n")[:-1] if line.strip()]
    return (
        len(lines) >= 2
        and lines[-1] in lines[:-1]
        and bool(loose_tool_calls("\n".join(lines[:-1]), names))
    )


# The last turn after a loop of repeated calls: no tools on offer, and this request.
FINAL_TURN = "Using the tool results above, answer my request in plain text now."


def as_registry(tools: ToolRegistry | Iterable[Tool]) -> ToolRegistry:
    return tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)


class FunctionCallingAgent:
    """Runs the model, executes the tools it calls, and feeds results back until it answers.

    ``max_steps`` bounds the model turns; generation options (``temperature``,
    ``max_new_tokens``, ...) go to every turn. Greedy decoding by default.
    """

    def __init__(
        self,
        model: Qwen,
        tools: ToolRegistry | Iterable[Tool],
        *,
        system: str | None = None,
        max_steps: int = 6,
        loose: bool = True,
        **options: Any,
    ) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        self.model = model
        self.tools = as_registry(tools)
        self.system = system
        self.loose = loose  # also accept tag-less JSON calls (see loose_tool_calls)
        self.max_steps = max_steps
        self.options = {"temperature": 0.0, "max_new_tokens": 512, **options}
        self.sequence = model.new_sequence()  # the conversation's KV cache, reused per turn

    def reply(
        self,
        messages: Sequence[Mapping[str, Any]],
        write: Callable[[str], None] | None = None,
        *,
        tools: bool = True,
    ) -> str:
        """One model turn (streamed through ``write`` if given); ``tools=False`` offers none.

        With ``loose`` parsing, a turn of tag-less JSON calls ends at the first line that
        repeats an earlier one: small models tend to loop over their calls until the token
        limit, and a repeated call adds nothing.
        """
        text = ""
        stream = self.model.chat_chunks(
            messages,
            tools=self.tools.schemas() if tools else None,
            sequence=self.sequence,
            **self.options,
        )
        try:
            for chunk in stream:
                if not chunk.text:
                    continue
                text += chunk.text
                if write:
                    write(chunk.text)
                if self.loose and "\n" in chunk.text and _repeats_a_call(text, self.tools.names):
                    break
        finally:
            stream.close()
        return text

    def run(
        self,
        query: str | Sequence[Mapping[str, Any]],
        *,
        write: Callable[[str], None] | None = None,
        on_step: Callable[[AgentStep], None] | None = None,
    ) -> AgentResult:
        """Answer ``query`` (a question, or a conversation to continue)."""
        messages: list[dict[str, Any]] = []
        if isinstance(query, str):
            if self.system is not None:
                messages.append({"role": "system", "content": self.system})
            messages.append({"role": "user", "content": query})
        else:
            messages = [dict(m) for m in query]
        steps: list[AgentStep] = []
        content = ""
        done: set[str] = set()  # calls already run, as name + arguments
        for _ in range(self.max_steps):
            text = self.reply(messages, write)
            content, calls = parse_tool_calls(text)
            if not calls and self.loose:
                calls = loose_tool_calls(text, self.tools.names)
                content = "" if calls else content
            keys = [json.dumps([c.name, c.arguments], sort_keys=True) for c in calls]
            if calls and all(k in done for k in keys):
                # Only calls whose results it already has: the model is looping. One last
                # turn with no tools on offer makes it answer from those results.
                if write:
                    write("\n")
                messages.append({"role": "user", "content": FINAL_TURN})
                content = self.reply(messages, write, tools=False)
                calls = []
            if not calls:
                steps.append(AgentStep(content))
                if on_step:
                    on_step(steps[-1])
                messages.append({"role": "assistant", "content": content})
                return AgentResult(content, steps, True, messages)
            messages.append(
                {
                    "role": "assistant",
                    "content": content,
                    "tool_calls": [c.to_message() for c in calls],
                }
            )
            for call, key in zip(calls, keys, strict=True):
                step = self._execute(call, content)
                done.add(key)
                steps.append(step)
                if on_step:
                    on_step(step)
                messages.append({"role": "tool", "name": call.name, "content": step.observation})
        return AgentResult(content, steps, False, messages)

    def _execute(self, call: ToolCall, text: str) -> AgentStep:
        result: ToolResult = self.tools.call(call.name, call.arguments)
        return AgentStep(text, call.name, call.arguments, result.text, result.error, result.files)


class ToolChatSession:
    """``qwenlm chat --tools``: a chat whose replies may call tools before they answer.

    Same ``reply(text, write)`` contract as :class:`qwenlm.cli.chat.ChatSession`; tool calls
    and their results are shown as they happen, and files they make (figures) are saved to
    ``files_dir``.
    """

    def __init__(
        self,
        model: Qwen,
        tools: ToolRegistry | Iterable[Tool],
        *,
        system: str | None = None,
        options: dict[str, Any] | None = None,
        files_dir: str | None = None,
        max_steps: int = 6,
    ) -> None:
        self.model = model
        self.system = system
        self.agent = FunctionCallingAgent(model, tools, max_steps=max_steps, **(options or {}))
        self.messages: list[dict[str, Any]] = []
        self.files_dir = files_dir

    def reset(self) -> None:
        self.messages = []

    def reply(self, text: str, write: Callable[[str], None]) -> dict[str, Any]:
        import os
        import tempfile

        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages += [*self.messages, {"role": "user", "content": text}]
        t0 = time.perf_counter()

        def show(step: AgentStep) -> None:
            if step.tool is None:
                return
            write(f"\n[{step.tool} {'failed' if step.error else 'returned'}]\n{step.observation}\n")
            for name, data in step.files.items():
                if self.files_dir is None:
                    self.files_dir = tempfile.mkdtemp(prefix="qwenlm-files-")
                path = os.path.join(self.files_dir, f"{len(os.listdir(self.files_dir)) + 1}-{name}")
                with open(path, "wb") as f:
                    f.write(data)
                write(f"[saved {path}]\n")

        finish = "stop"
        try:
            result = self.agent.run(messages, write=write, on_step=show)
            if not result.finished:
                finish = "length"
                write("\n[stopped after the tool-call step limit]")
            new = result.transcript[len(messages) - 1 :]
        except KeyboardInterrupt:
            finish, new = "interrupted", [{"role": "user", "content": text}]
        self.messages = [m for m in [*self.messages, *new] if m.get("role") != "system"]
        return {
            "finish_reason": finish,
            "completion_tokens": 0,
            "prompt_tokens": 0,
            "seconds": time.perf_counter() - t0,
        }


TOOL_NAMES = {"code": "code_interpreter", "calculator": "calculator"}


def parse_tool_names(spec: str) -> list[str]:
    """``"code,calculator"`` -> the names, checked (``qwenlm chat --tools``)."""
    from qwenlm.agent.tools import ToolError

    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [n for n in names if n not in TOOL_NAMES]
    if unknown or not names:
        raise ToolError(
            f"unknown tool(s): {', '.join(unknown) or repr(spec)}",
            hint=f"tools are {', '.join(TOOL_NAMES)}",
        )
    return names


@contextlib.contextmanager
def tool_chat_session(
    model: Qwen, tools: str, *, system: str | None = None, options: dict[str, Any] | None = None
) -> Iterator[ToolChatSession]:
    """A :class:`ToolChatSession` with the tools named in ``tools`` ("code", "calculator",
    comma-separated); the code interpreter's sandbox is shut down on exit."""
    from qwenlm.agent.code_interpreter import CodeInterpreter
    from qwenlm.agent.tools import calculator_tool

    names = parse_tool_names(tools)
    registry = ToolRegistry()
    with contextlib.ExitStack() as stack:
        if "code" in names:
            interpreter = stack.enter_context(CodeInterpreter())
            registry.add(interpreter.as_tool())
        if "calculator" in names:
            registry.add(calculator_tool())
        yield ToolChatSession(model, registry, system=system, options=options)
