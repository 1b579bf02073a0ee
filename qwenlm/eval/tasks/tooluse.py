"""A tool-use benchmark in the terms of the Qwen model cards.

- **Tool selection accuracy**: on queries that need a tool, the share where the model's first
  call names the expected tool.
- **Tool input Rouge-L**: on those queries, Rouge-L F1 between the arguments the model wrote
  and the expected ones (both as JSON with sorted keys; 0 when no call was made).
- **False-positive rate**: on queries that need no tool, the share where the model calls one.

Data: a JSON file ``{"tools": [OpenAI-style function definitions], "cases": [{"id", "query",
"tools": [names offered], "expected": {"name", "arguments"} | null}]}``. The default is
``data/eval/tooluse.json`` of this repository (36 cases written for it, 12 needing no tool).
The model is prompted with native function calling (Qwen2.5's ``<tool_call>``) or with the
ReAct prompt (``method="react"``); no tool is executed. Calls are read the way the agents read
them (tag-less JSON calls count, as in :class:`FunctionCallingAgent`); ``tagged_call_rate``
says how many calls used the template's own format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwenlm.agent.function_calling import loose_tool_calls
from qwenlm.agent.react import parse_action, react_prompt
from qwenlm.agent.tools import Tool, ToolRegistry
from qwenlm.chat.tools import parse_tool_calls
from qwenlm.eval.run import EvalEngine, EvalError, Request
from qwenlm.eval.scoring import rouge_l

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "data" / "eval" / "tooluse.json"


def arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, ensure_ascii=False, sort_keys=True)


class ToolUse:
    name = "tooluse"

    def __init__(
        self,
        data: str | Path | None = None,
        *,
        method: str = "function_calling",
        max_new_tokens: int = 256,
    ) -> None:
        if method not in ("function_calling", "react"):
            raise EvalError(
                f"unknown tool-use method {method!r}", hint="use function_calling or react"
            )
        self.data = Path(data) if data else DEFAULT_DATA
        self.method = method
        self.max_new_tokens = max_new_tokens
        self._tools: dict[str, dict[str, Any]] = {}

    def config(self) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "method": self.method,
            "max_new_tokens": self.max_new_tokens,
        }

    def load(self) -> list[dict[str, Any]]:
        if not self.data.is_file():
            raise EvalError(
                f"no such tool-use data file: {self.data}", hint="pass --data FILE.json"
            )
        try:
            data = json.loads(self.data.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EvalError(f"{self.data}: not valid JSON ({e.msg})") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("tools"), list)
            or not isinstance(data.get("cases"), list)
        ):
            raise EvalError(f"{self.data}: expected an object with 'tools' and 'cases' lists")
        self._tools = {t["function"]["name"]: t for t in data["tools"]}
        samples = []
        for case in data["cases"]:
            missing = [k for k in ("id", "query", "tools") if k not in case]
            if missing:
                raise EvalError(f"{self.data}: case {case.get('id')} lacks {', '.join(missing)}")
            unknown = [t for t in case["tools"] if t not in self._tools]
            if unknown:
                raise EvalError(
                    f"{self.data}: case {case['id']} offers undefined tool(s) {', '.join(unknown)}"
                )
            expected = case.get("expected")
            if expected is not None and expected.get("name") not in case["tools"]:
                raise EvalError(f"{self.data}: case {case['id']} expects a tool it does not offer")
            samples.append(
                {
                    "id": case["id"],
                    "query": case["query"],
                    "tools": case["tools"],
                    "expected": expected,
                }
            )
        return samples

    def _registry(self, names: list[str]) -> ToolRegistry:
        def unused(**_: Any) -> str:
            return ""

        return ToolRegistry(
            Tool(
                n,
                self._tools[n]["function"]["description"],
                self._tools[n]["function"]["parameters"],
                unused,
            )
            for n in names
        )

    def request(self, engine: EvalEngine, sample: dict[str, Any]) -> Request:
        if not self._tools:
            self.load()
        if self.method == "react":
            text = react_prompt(sample["query"], self._registry(sample["tools"]))
            return Request(
                engine.chat_prompt([{"role": "user", "content": text}]),
                self.max_new_tokens,
                ("Observation:",),
            )
        schemas = [self._tools[n] for n in sample["tools"]]
        ids = engine.model.encode_chat(
            [{"role": "user", "content": sample["query"]}], tools=schemas
        )
        return Request(tuple(ids), self.max_new_tokens)

    def predicted_call(self, reply: str, offered: list[str]) -> tuple[str | None, str | None, bool]:
        """(tool, arguments as text, whether the call used Qwen's <tool_call> tags).

        Function calling reads calls the way the agent does: tagged calls, else a reply that
        is only a JSON call naming an offered tool (see ``loose_tool_calls``).
        """
        if self.method == "react":
            action = parse_action(reply)
            final = reply.find("Final Answer:")
            if action is None or 0 <= final < reply.find("Action:"):
                return None, None, False
            return action[0], arguments_text(action[1]), True
        _, calls = parse_tool_calls(reply)
        tagged = bool(calls)
        if not calls:
            calls = loose_tool_calls(reply, offered)
        if not calls:
            return None, None, False
        return calls[0].name, arguments_text(calls[0].arguments), tagged

    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outs = engine.complete([self.request(engine, s) for s in samples])
        records = []
        for s, c in zip(samples, outs, strict=True):
            name, args, tagged = self.predicted_call(c.text, s["tools"])
            expected = s["expected"]
            record = {
                "id": s["id"],
                "needs_tool": expected is not None,
                "reply": c.text,
                "called": name,
                "arguments": args,
                "tagged": tagged,
            }
            if expected is not None:
                record["selection_correct"] = name == expected["name"]
                record["input_rouge_l"] = (
                    rouge_l(args, arguments_text(expected["arguments"]))
                    if args is not None
                    else 0.0
                )
                record["score"] = float(record["selection_correct"])
            else:
                record["false_positive"] = name is not None
                record["score"] = float(name is None)
            records.append(record)
        return records

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        need = [r for r in records if r["needs_tool"]]
        none = [r for r in records if not r["needs_tool"]]
        out: dict[str, float] = {}
        if need:
            out["tool_selection_accuracy"] = sum(r["selection_correct"] for r in need) / len(need)
            out["tool_input_rouge_l"] = sum(r["input_rouge_l"] for r in need) / len(need)
        if none:
            out["false_positive_rate"] = sum(r["false_positive"] for r in none) / len(none)
        called = [r for r in records if r["called"] is not None]
        if called and self.method == "function_calling":
            # how often the model used the template's own <tool_call> format
            out["tagged_call_rate"] = sum(r["tagged"] for r in called) / len(called)
        return out
