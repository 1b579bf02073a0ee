"""MATH (Hendrycks et al., 2021): competition problems with LaTeX answers in ``\\boxed{}``.

Data: the published layout (a folder of ``SUBJECT/N.json`` files, each an object with
``problem``, ``solution``, ``level``, ``type``), one such JSON file, a JSON array of them, or
JSON lines (as in MATH-500, where an ``answer`` field may also be given). The reference is the
last ``\\boxed{}`` of the solution; answers are compared after normalisation
(:func:`qwenlm.eval.scoring.normalize_math`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from qwenlm.eval.run import (
    EvalEngine,
    EvalError,
    Request,
    check_mode,
    read_jsonl,
    require,
    task_data,
)
from qwenlm.eval.scoring import last_boxed, math_equal

CHAT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def read_problems(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        rows = []
        for f in sorted(path.rglob("*.json")):
            try:
                row = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise EvalError(f"{f}: not valid JSON ({e.msg})") from None
            rows.append({"id": str(f.relative_to(path).with_suffix("")), **row})
        return rows
    if path.suffix in (".jsonl", ".gz"):
        return [
            {"id": str(r.get("unique_id", r.get("id", n))), **r}
            for n, r in enumerate(read_jsonl(path), 1)
        ]
    if not path.is_file():
        raise EvalError(f"no such MATH data file or folder: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e.msg})") from None
    items = data if isinstance(data, list) else [data]
    return [
        {
            "id": str(r.get("id", n)) if isinstance(r, dict) else str(n),
            **(r if isinstance(r, dict) else {}),
        }
        for n, r in enumerate(items, 1)
    ]


class MATH:
    name = "math"

    def __init__(
        self, data: str | Path | None = None, *, mode: str = "chat", max_new_tokens: int = 768
    ) -> None:
        self.data = task_data(
            "math", data, "data", "pass --data FOLDER (MATH/test) or a .json/.jsonl file"
        )
        self.mode = check_mode(mode)
        self.max_new_tokens = max_new_tokens

    def config(self) -> dict[str, Any]:
        return {"data": str(self.data), "mode": self.mode, "max_new_tokens": self.max_new_tokens}

    def load(self) -> list[dict[str, Any]]:
        samples = []
        for row in read_problems(self.data):
            require(row, ("problem",), f"{self.data} problem {row.get('id')}")
            reference = row.get("answer") or last_boxed(str(row.get("solution", "")))
            if reference is None:
                raise EvalError(
                    f"{self.data} problem {row['id']}: no answer field and no \\boxed{{}} in the "
                    f"solution"
                )
            samples.append(
                {
                    "id": row["id"],
                    "problem": row["problem"],
                    "reference": str(reference),
                    "type": row.get("type", row.get("subject", "")),
                    "level": row.get("level", ""),
                }
            )
        return samples

    def request(self, engine: EvalEngine, problem: str) -> Request:
        if self.mode == "base":
            return Request(
                engine.text_prompt(f"Problem:\n{problem}\n\nSolution:"),
                self.max_new_tokens,
                ("\n\nProblem:",),
            )
        return Request(
            engine.chat_prompt([{"role": "user", "content": problem + CHAT_SUFFIX}]),
            self.max_new_tokens,
        )

    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outs = engine.complete([self.request(engine, s["problem"]) for s in samples])
        records = []
        for s, c in zip(samples, outs, strict=True):
            pred = last_boxed(c.text)
            records.append(
                {
                    "id": s["id"],
                    "type": s["type"],
                    "level": s["level"],
                    "reference": s["reference"],
                    "prediction": pred,
                    "reply": c.text,
                    "score": float(math_equal(pred, s["reference"])),
                }
            )
        return records

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        out = {"accuracy": sum(r["score"] for r in records) / len(records)}
        by_type: dict[str, list[float]] = defaultdict(list)
        for r in records:
            if r.get("type"):
                by_type[r["type"]].append(r["score"])
        for t, v in sorted(by_type.items()):
            out[f"accuracy/{t}"] = sum(v) / len(v)
        return out
