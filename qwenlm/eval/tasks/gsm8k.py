"""GSM8K (Cobbe et al., 2021): grade-school math word problems, 8-shot chain of thought.

Data: JSON lines with ``question`` and ``answer``, the answer's last line being ``#### N``
(the published ``test.jsonl``). The shots are the eight chain-of-thought exemplars of Wei et
al. (2022); the predicted answer is the number after "The answer is" (else the last number).
"""

from __future__ import annotations

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
from qwenlm.eval.scoring import extract_number, normalize_number

# (question, chain of thought ending in "The answer is N.")
EXEMPLARS = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After "
        "they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So "
        "there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
        "parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they "
        "have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How "
        "many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave "
        "Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many "
        "toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 "
        "more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each "
        "day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 "
        "* 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 "
        "more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has "
        "23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
]


def reference_answer(answer: str) -> str | None:
    """The number after ``####`` in a GSM8K answer."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


class GSM8K:
    name = "gsm8k"

    def __init__(
        self,
        data: str | Path | None = None,
        *,
        mode: str = "chat",
        shots: int | None = None,
        max_new_tokens: int = 384,
    ) -> None:
        self.data = task_data(
            "gsm8k", data, "data file", "pass --data test.jsonl (lines with question and answer)"
        )
        self.mode = check_mode(mode)
        self.shots = 8 if shots is None else shots
        if not 0 <= self.shots <= len(EXEMPLARS):
            raise EvalError(f"gsm8k shots must be 0..{len(EXEMPLARS)}, got {self.shots}")
        self.max_new_tokens = max_new_tokens

    def config(self) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "mode": self.mode,
            "shots": self.shots,
            "max_new_tokens": self.max_new_tokens,
        }

    def load(self) -> list[dict[str, Any]]:
        rows = read_jsonl(self.data)
        samples = []
        for n, row in enumerate(rows, 1):
            require(row, ("question", "answer"), f"{self.data} line {n}")
            ref = reference_answer(str(row["answer"]))
            if ref is None:
                raise EvalError(f"{self.data} line {n}: the answer has no '#### N' final line")
            samples.append(
                {"id": str(row.get("id", n)), "question": row["question"], "reference": ref}
            )
        return samples

    def request(self, engine: EvalEngine, question: str) -> Request:
        shots = EXEMPLARS[: self.shots]
        if self.mode == "base":
            text = (
                "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
                + f"Question: {question}\nAnswer:"
            )
            return Request(
                engine.text_prompt(text), self.max_new_tokens, ("\n\nQuestion:", "\n\n\n")
            )
        messages = []
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        return Request(engine.chat_prompt(messages), self.max_new_tokens)

    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outs = engine.complete([self.request(engine, s["question"]) for s in samples])
        records = []
        for s, c in zip(samples, outs, strict=True):
            pred = extract_number(c.text)
            records.append(
                {
                    "id": s["id"],
                    "reference": s["reference"],
                    "prediction": pred,
                    "reply": c.text,
                    "score": float(pred is not None and pred == s["reference"]),
                }
            )
        return records

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return {"accuracy": sum(r["score"] for r in records) / len(records)} if records else {}
