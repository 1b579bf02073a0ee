"""MBPP (Austin et al., 2021): short Python problems checked by three asserts each.

Data: the published JSON lines (``mbpp.jsonl``: ``task_id``, ``text``, ``code``, ``test_list``,
``test_setup_code``) or the sanitized set (``prompt`` instead of ``text``, ``test_imports``).
Chat mode: the problem and its tests in one message, the code block of the reply is tested.
Base mode: the MBPP paper's prompt with three shots (task ids 2-4 when present, else the first
three records; those are not scored), code between ``[BEGIN]`` and ``[DONE]``. Programs run in
:mod:`qwenlm.sandbox`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwenlm.eval.execution import TEST_LIMITS, run_tests
from qwenlm.eval.run import (
    EvalEngine,
    EvalError,
    Request,
    check_mode,
    read_jsonl,
    require,
    task_data,
)
from qwenlm.eval.scoring import extract_code
from qwenlm.sandbox import Sandbox

CHAT_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass "
    "these tests:\n\n{tests}\n\nWrite the function in a Python code block."
)


def describe(text: str, tests: list[str]) -> str:
    return (
        f"You are an expert Python programmer, and here is your task: {text} Your code should pass "
        f"these tests:\n\n" + "\n".join(tests) + "\n"
    )


class MBPP:
    name = "mbpp"

    def __init__(
        self,
        data: str | Path | None = None,
        *,
        mode: str = "chat",
        shots: int | None = None,
        max_new_tokens: int = 512,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.data = task_data(
            "mbpp", data, "data file", "pass --data mbpp.jsonl (or the sanitized JSON lines)"
        )
        self.mode = check_mode(mode)
        self.shots = 3 if shots is None else shots
        self.max_new_tokens = max_new_tokens
        self.sandbox = sandbox
        self._shots: list[dict[str, Any]] = []

    def config(self) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "mode": self.mode,
            "shots": self.shots if self.mode == "base" else 0,
            "max_new_tokens": self.max_new_tokens,
        }

    def load(self) -> list[dict[str, Any]]:
        rows = []
        for n, row in enumerate(read_jsonl(self.data), 1):
            require(row, ("task_id", "test_list"), f"{self.data} line {n}")
            text = row.get("text", row.get("prompt"))
            if not isinstance(text, str) or not isinstance(row["test_list"], list):
                raise EvalError(
                    f"{self.data} line {n}: needs a text (or prompt) string and a test_list array"
                )
            setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
            rows.append(
                {
                    "id": row["task_id"],
                    "text": text,
                    "tests": [str(t) for t in row["test_list"]],
                    "setup": setup,
                    "code": row.get("code", ""),
                }
            )
        if self.mode == "base" and self.shots:
            preferred = [r for r in rows if r["id"] in (2, 3, 4)]
            self._shots = (preferred if len(preferred) >= self.shots else rows)[: self.shots]
            chosen = {r["id"] for r in self._shots}
            rows = [r for r in rows if r["id"] not in chosen]
        return rows

    def request(self, engine: EvalEngine, s: dict[str, Any]) -> Request:
        if self.mode == "chat":
            content = CHAT_PROMPT.format(text=s["text"], tests="\n".join(s["tests"]))
            return Request(
                engine.chat_prompt([{"role": "user", "content": content}]), self.max_new_tokens
            )
        text = "".join(
            f"{describe(e['text'], e['tests'])}[BEGIN]\n{e['code']}\n[DONE]\n" for e in self._shots
        )
        text += describe(s["text"], s["tests"]) + "[BEGIN]\n"
        return Request(engine.text_prompt(text), self.max_new_tokens, ("[DONE]",))

    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sandbox = self.sandbox or Sandbox(TEST_LIMITS)
        outs = engine.complete([self.request(engine, s) for s in samples])
        records = []
        for s, c in zip(samples, outs, strict=True):
            code = extract_code(c.text) if self.mode == "chat" else c.text
            program = "\n".join([s["setup"], code, *s["tests"]]) + "\n"
            result = run_tests(program, sandbox=sandbox)
            records.append(
                {
                    "id": s["id"],
                    "completion": c.text,
                    "passed": result.passed,
                    "status": result.status,
                    "detail": result.detail,
                    "score": float(result.passed),
                }
            )
        return records

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return {"pass@1": sum(r["score"] for r in records) / len(records)} if records else {}
