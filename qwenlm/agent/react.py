"""The ReAct loop of the Qwen repository: Thought / Action / Action Input / Observation, until
a Final Answer.

The prompt is the Qwen repo's ReAct prompt, sent as the user turn; the assistant's turn grows
with each step. Generation stops where the model would write ``Observation:``; the framework
runs the named tool and appends the observation, then lets the model continue. The whole
assistant text is encoded as plain text, so an observation can never become a control token,
and Actions are parsed only from what the model generated in the current step, never from an
observation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from qwenlm.agent.function_calling import AgentResult, AgentStep, as_registry
from qwenlm.agent.tools import Tool, ToolRegistry

TOOL_DESC = (
    "{name}: Call this tool to interact with the {human} API. What is the {human} API useful "
    "for? {description} Parameters: {parameters} Format the arguments as a JSON object."
)

REACT_PROMPT = """\
Answer the following questions as best you can. You have access to the following tools:

{tool_descs}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!

Question: {query}"""

_ACTION = re.compile(r"Action\s*:\s*(.*?)\s*\n\s*Action Input\s*:\s*(.*)", re.DOTALL)


def react_prompt(query: str, tools: ToolRegistry) -> str:
    descs = []
    for t in tools:
        params = []
        props = t.parameters.get("properties", {})
        for name, spec in props.items():
            params.append(
                {
                    "name": name,
                    "description": spec.get("description", ""),
                    "required": name in t.parameters.get("required", []),
                    "schema": {"type": spec.get("type", "string")},
                }
            )
        descs.append(
            TOOL_DESC.format(
                name=t.name,
                human=t.name_for_human or t.name,
                description=t.description,
                parameters=json.dumps(params, ensure_ascii=False),
            )
        )
    return REACT_PROMPT.format(
        tool_descs="\n\n".join(descs), tool_names=",".join(tools.names), query=query
    )


def parse_action(text: str) -> tuple[str, str] | None:
    """``(tool name, raw input)`` of the last Action in ``text``, or None."""
    matches = list(_ACTION.finditer(text))
    if not matches:
        return None
    name, raw = matches[-1].group(1), matches[-1].group(2)
    return name.strip().strip("`'\"[]"), raw.strip()


def action_arguments(raw: str, tool: Tool | None) -> Any:
    """The Action Input as tool arguments: a JSON object, or, for a tool with one string
    parameter, the plain text (models often write ``Action Input: 2 + 2``)."""
    text = raw.strip()
    if text.startswith("```"):
        text = re.sub(r"^```\w*\n?|\n?```$", "", text).strip()
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except json.JSONDecodeError:
        pass
    if tool is not None:
        props = list(tool.parameters.get("properties", {}))
        if len(props) == 1:
            return {props[0]: text}
    return text  # the registry reports it as invalid arguments


class ReActAgent:
    """The Qwen ReAct loop over a tool registry. Greedy decoding by default."""

    def __init__(
        self,
        model: Any,
        tools: ToolRegistry | Iterable[Tool],
        *,
        max_steps: int = 6,
        **options: Any,
    ) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        self.model = model
        self.tools = as_registry(tools)
        self.max_steps = max_steps
        # The model stops where an observation belongs; the framework supplies it.
        self.stop = (*options.pop("stop", ()), "Observation:")
        self.options = {"temperature": 0.0, "max_new_tokens": 512, **options}
        self.sequence = model.new_sequence()  # reused: each step extends the same turn

    def run(self, query: str, *, on_step: Callable[[AgentStep], None] | None = None) -> AgentResult:
        prompt = self.model.encode_chat(
            [{"role": "user", "content": react_prompt(query, self.tools)}]
        )
        text = ""  # the assistant's turn so far
        steps: list[AgentStep] = []
        for _ in range(self.max_steps):
            ids = prompt + self.model.tokenizer.encode(text)
            out = "".join(
                c.text
                for c in self.model.generate_chunks(
                    ids, sequence=self.sequence, stop=self.stop, **self.options
                )
            )
            text += out
            final = out.rfind("Final Answer:")
            action = parse_action(out)
            if final >= 0 and (action is None or out.rfind("Action:") < final):
                answer = out[final + len("Final Answer:") :].strip()
                steps.append(AgentStep(out))
                if on_step:
                    on_step(steps[-1])
                return AgentResult(answer, steps, True, text)
            if action is None:
                # No tool and no marker: the model answered in its own words.
                steps.append(AgentStep(out))
                if on_step:
                    on_step(steps[-1])
                return AgentResult(out.strip(), steps, True, text)
            name, raw = action
            if name not in self.tools:
                # "Action: use the calculator" names one tool in passing: take it.
                mentioned = [t for t in self.tools.names if t.lower() in name.lower()]
                name = mentioned[0] if len(mentioned) == 1 else name
            args = action_arguments(raw, self.tools.get(name))
            result = self.tools.call(name, args)
            step = AgentStep(out, name, args, result.text, result.error, result.files)
            steps.append(step)
            if on_step:
                on_step(step)
            text = text.rstrip() + f"\nObservation: {result.text}\nThought:"
        return AgentResult("", steps, False, text)
