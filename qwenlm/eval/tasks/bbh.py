"""BIG-Bench Hard (Suzgun et al., 2022): 27 reasoning tasks with exact-match answers.

Data, as published: a folder of ``TASK.json`` files, each ``{"examples": [{"input": ...,
"target": ...}]}`` (or one such file). When the folder (or its parent) has the published
``cot-prompts/TASK.txt`` (3-shot chain of thought), they are used and the answer is read after
"So the answer is"; otherwise the first ``shots`` examples of each task become answer-only
shots and are not scored.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from qwenlm.eval.run import EvalEngine, EvalError, Request, check_mode, task_data

ANSWER = re.compile(r"[Ss]o the answer is\s*(.*?)\s*(?:\.\s*$|\.\s*\n|$)", re.MULTILINE)


def normalize_answer(text: str) -> str:
    t = text.strip().strip("*").strip()
    t = t.rstrip(".").strip()
    m = re.fullmatch(r"\(?([A-Z])\)?", t)
    if m:  # "(A)", "A" and "A)" all mean option A
        return f"({m.group(1)})"
    return t.lower()


def extract_answer(reply: str, *, cot: bool) -> str:
    if cot:
        found = ANSWER.findall(reply)
        if found:
            return found[-1]
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def read_cot_prompt(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    # The published files start with a canary/description block ended by a "-----" line.
    if "-----" in text:
        text = text.split("-----", 1)[1]
    return text.strip()


class BBH:
    name = "bbh"

    def __init__(
        self,
        data: str | Path | None = None,
        *,
        mode: str = "chat",
        shots: int | None = None,
        max_new_tokens: int = 384,
    ) -> None:
        self.data = task_data(
            "bbh", data, "data", "pass --data FOLDER of TASK.json files (see the README)"
        )
        self.mode = check_mode(mode)
        self.shots = 3 if shots is None else shots
        self.max_new_tokens = max_new_tokens
        self._prompts: dict[str, tuple[str, bool]] = {}

    def config(self) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "mode": self.mode,
            "shots": self.shots,
            "max_new_tokens": self.max_new_tokens,
        }

    def _cot_dir(self, folder: Path) -> Path | None:
        for d in (folder / "cot-prompts", folder.parent / "cot-prompts"):
            if d.is_dir():
                return d
        return None

    def load(self) -> list[dict[str, Any]]:
        files = sorted(self.data.glob("*.json")) if self.data.is_dir() else [self.data]
        if not files or not files[0].is_file():
            raise EvalError(f"no BBH task files (TASK.json) at {self.data}")
        cot_dir = self._cot_dir(self.data if self.data.is_dir() else self.data.parent)
        samples = []
        for path in files:
            task = path.stem
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}: not valid JSON ({e.msg})") from None
            examples = data.get("examples") if isinstance(data, dict) else None
            if not isinstance(examples, list) or not all(
                isinstance(e, dict) and "input" in e and "target" in e for e in examples
            ):
                raise EvalError(
                    f'{path}: expected {{"examples": [{{"input": ..., "target": ...}}]}}'
                )
            cot = cot_dir / f"{task}.txt" if cot_dir else None
            if cot is not None and cot.is_file():
                self._prompts[task] = (read_cot_prompt(cot) + "\n\n", True)
                scored = examples
            else:
                shots = examples[: self.shots]
                self._prompts[task] = (
                    "".join(f"Q: {e['input']}\nA: {e['target']}\n\n" for e in shots),
                    False,
                )
                scored = examples[self.shots :]
            for i, e in enumerate(scored):
                samples.append(
                    {
                        "id": f"{task}/{i}",
                        "task": task,
                        "input": str(e["input"]),
                        "target": str(e["target"]),
                    }
                )
        return samples

    def request(self, engine: EvalEngine, sample: dict[str, Any]) -> Request:
        if not self._prompts:
            self.load()
        prefix, cot = self._prompts[sample["task"]]
        text = prefix + f"Q: {sample['input']}\nA:" + (" Let's think step by step." if cot else "")
        if self.mode == "base":
            return Request(
                engine.text_prompt(text),
                self.max_new_tokens,
                ("\n\nQ:",) + (() if cot else ("\n",)),
            )
        return Request(engine.chat_prompt([{"role": "user", "content": text}]), self.max_new_tokens)

    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outs = engine.complete([self.request(engine, s) for s in samples])
        records = []
        for s, c in zip(samples, outs, strict=True):
            pred = extract_answer(c.text, cot=self._prompts[s["task"]][1])
            ok = normalize_answer(pred) == normalize_answer(s["target"])
            records.append(
                {
                    "id": s["id"],
                    "task": s["task"],
                    "target": s["target"],
                    "prediction": pred,
                    "reply": c.text,
                    "score": float(ok),
                }
            )
        return records

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        by_task: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_task[r["task"]].append(r["score"])
        return {
            "accuracy": sum(r["score"] for r in records) / len(records),
            "task_average": sum(sum(v) / len(v) for v in by_task.values()) / len(by_task),
        }
