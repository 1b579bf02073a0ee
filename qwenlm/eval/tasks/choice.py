"""Multiple-choice exams (MMLU, CMMLU, C-Eval): shared prompting and scoring.

Base mode: k-shot prompts from the dev split, scored by which answer letter's token gets the
highest next-token logit (no generation). Chat mode: zero-shot through the chat template,
the letter extracted from the reply.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenlm.eval.run import EvalEngine, EvalError, Request, check_mode, task_data
from qwenlm.eval.scoring import extract_choice

LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    id: str
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"
    explanation: str = ""


def read_csv(
    path: Path, *, header: bool, columns: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts. Headerless files (MMLU) get question,A,B,C,D,answer."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not UTF-8 text") from None
    if not rows:
        return []
    if header:
        names, rows = [c.strip() for c in rows[0]], rows[1:]
    else:
        names = ["question", "A", "B", "C", "D", "answer"]
    out = []
    for n, row in enumerate(rows, 2 if header else 1):
        if not any(c.strip() for c in row):
            continue
        if len(row) < len(names):
            raise EvalError(
                f"{path}:{n}: expected {len(names)} columns ({', '.join(names)}), got {len(row)}"
            )
        record = dict(zip(names, row, strict=False))
        if columns:
            record = {columns.get(k, k): v for k, v in record.items()}
        out.append(record)
    return out


def to_question(row: dict[str, str], subject: str, qid: str, where: str) -> Question:
    missing = [k for k in ("question", "A", "B", "C", "D", "answer") if k not in row]
    if missing:
        raise EvalError(f"{where}: missing column(s) {', '.join(missing)}")
    answer = row["answer"].strip().upper()
    if answer not in LETTERS:
        raise EvalError(f"{where}: answer must be one of A, B, C, D, got {row['answer']!r}")
    return Question(
        qid,
        subject,
        row["question"].strip(),
        (row["A"].strip(), row["B"].strip(), row["C"].strip(), row["D"].strip()),
        answer,
        row.get("explanation", "").strip(),
    )


def find_split(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first existing folder among ``root/NAME`` and ``root/data/NAME``."""
    for name in names:
        for base in (root, root / "data"):
            if (base / name).is_dir():
                return base / name
    return None


def read_subjects(
    root: Path,
    dataset: str,
    split: str,
    suffixes: tuple[str, str],
    *,
    header: bool,
    columns: dict[str, str] | None = None,
    id_column: str | None = None,
) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """(questions by subject, dev shots by subject) from ``split/`` and ``dev/`` under ``root``.

    Subject ``S`` is read from ``split/S{suffixes[0]}`` and its shots, where present, from
    ``dev/S{suffixes[1]}``. Question ids are ``S/N`` (or ``S/<id_column>``) and ``S/devN``.
    """
    split_dir = find_split(root, (split,))
    if split_dir is None:
        raise EvalError(
            f"no {split}/ folder under {root}",
            hint=f"--data is the {dataset} folder holding dev/ and {split}/",
        )
    dev_dir = find_split(root, ("dev",))
    first_line = 2 if header else 1

    def questions(path: Path, subject: str, dev: bool) -> list[Question]:
        out = []
        for i, r in enumerate(read_csv(path, header=header, columns=columns)):
            key = f"dev{i}" if dev else r.get(id_column, i) if id_column else i
            out.append(to_question(r, subject, f"{subject}/{key}", f"{path}:{i + first_line}"))
        return out

    test, shots = {}, {}
    for path in sorted(split_dir.glob(f"*{suffixes[0]}")):
        subject = path.name.removesuffix(suffixes[0])
        test[subject] = questions(path, subject, dev=False)
        dev_path = dev_dir / f"{subject}{suffixes[1]}" if dev_dir else None
        if dev_path and dev_path.is_file():
            shots[subject] = questions(dev_path, subject, dev=True)
    return test, shots


class MultipleChoice:
    """A multiple-choice benchmark; subclasses say how to read their files and phrase prompts."""

    name = "choice"
    default_shots = 5
    # prompt pieces, overridden per benchmark
    header = "The following are multiple choice questions (with answers) about {subject}.\n\n"
    answer_prefix = "Answer:"
    letter_spacing = " "  # what stands between the answer prefix and the letter
    chat_instruction = (
        "The following is a multiple choice question about {subject}. Reply with the letter "
        "of the correct answer (A, B, C or D) first.\n\n{body}"
    )

    def __init__(
        self,
        data: str | Path | None = None,
        *,
        mode: str = "chat",
        shots: int | None = None,
        max_new_tokens: int = 64,
    ) -> None:
        hint = f"pass --data PATH (the {self.name} folder layout is in the README)"
        self.root = task_data(self.name, data, "data folder", hint)
        if not self.root.is_dir():
            raise EvalError(f"{self.name} data folder not found: {self.root}")
        self.mode = check_mode(mode)
        self.shots = self.default_shots if shots is None else shots
        self.max_new_tokens = max_new_tokens
        self._dev: dict[str, list[Question]] = {}

    def config(self) -> dict[str, Any]:
        return {
            "data": str(self.root),
            "mode": self.mode,
            "shots": self.shots if self.mode == "base" else 0,
        }

    # -- reading (per benchmark) ---------------------------------------------------------------
    def read(self) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
        """(questions to score by subject, dev examples by subject)."""
        raise NotImplementedError

    def subject_name(self, subject: str) -> str:
        return subject.replace("_", " ")

    def load(self) -> list[dict[str, Any]]:
        test, dev = self.read()
        if not test:
            raise EvalError(
                f"no {self.name} questions found under {self.root}",
                hint="see the README for the expected layout",
            )
        self._dev = dev
        return [{"id": q.id, "question": q} for subject in sorted(test) for q in test[subject]]

    # -- prompts -------------------------------------------------------------------------------
    def body(self, q: Question) -> str:
        options = "\n".join(
            f"{letter}. {text}" for letter, text in zip(LETTERS, q.options, strict=True)
        )
        return f"{q.question}\n{options}\n"

    def example(self, q: Question, *, with_answer: bool) -> str:
        text = self.body(q) + self.answer_prefix
        return text + (f"{self.letter_spacing}{q.answer}\n\n" if with_answer else "")

    def base_prompt(self, q: Question) -> str:
        shots = self._dev.get(q.subject, [])[: self.shots]
        prompt = self.header.format(subject=self.subject_name(q.subject))
        prompt += "".join(self.example(s, with_answer=True) for s in shots)
        return prompt + self.example(q, with_answer=False)

    def chat_prompt(self, q: Question) -> str:
        return self.chat_instruction.format(
            subject=self.subject_name(q.subject), body=self.body(q).rstrip()
        )

    def letter_ids(self, engine: EvalEngine) -> tuple[list[int], list[int]]:
        """(tokens to append to the prompt, the token of each letter that follows them).

        With Qwen's vocabulary " A" (or "A" after "：") is one token and nothing is appended;
        a vocabulary that splits it gets the shared leading tokens appended instead.
        """
        base = engine.tokenizer.encode(self.answer_prefix)
        tails = []
        for letter in LETTERS:
            full = engine.tokenizer.encode(self.answer_prefix + self.letter_spacing + letter)
            if full[: len(base)] != base or len(full) == len(base):
                raise EvalError(f"{self.name}: cannot find the answer letter {letter!r} as a token")
            tails.append(full[len(base) :])
        extra = tails[0][:-1]
        if any(t[:-1] != extra for t in tails) or len({t[-1] for t in tails}) != len(LETTERS):
            raise EvalError(f"{self.name}: the answer letters do not differ in one token")
        return extra, [t[-1] for t in tails]

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, engine: EvalEngine, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        questions: list[Question] = [s["question"] for s in samples]
        records = []
        if self.mode == "base":
            extra, letters = self.letter_ids(engine)
            prompts = [engine.text_prompt(self.base_prompt(q)) + tuple(extra) for q in questions]
            scores = engine.next_token_logprobs(prompts, letters)
            for q, s in zip(questions, scores, strict=True):
                pred = LETTERS[max(range(4), key=lambda i: s[i])]
                records.append(
                    {
                        "id": q.id,
                        "subject": q.subject,
                        "answer": q.answer,
                        "prediction": pred,
                        "logprobs": [round(x, 4) for x in s],
                        "score": float(pred == q.answer),
                    }
                )
            return records
        requests = [
            Request(
                engine.chat_prompt([{"role": "user", "content": self.chat_prompt(q)}]),
                self.max_new_tokens,
            )
            for q in questions
        ]
        for q, c in zip(questions, engine.complete(requests), strict=True):
            pred = extract_choice(c.text)
            records.append(
                {
                    "id": q.id,
                    "subject": q.subject,
                    "answer": q.answer,
                    "prediction": pred,
                    "reply": c.text,
                    "score": float(pred == q.answer),
                }
            )
        return records

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {}
        by_subject: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_subject[r["subject"]].append(r["score"])
        out = {"accuracy": sum(r["score"] for r in records) / len(records)}
        out["subject_average"] = sum(sum(v) / len(v) for v in by_subject.values()) / len(by_subject)
        out["subjects"] = float(len(by_subject))
        return out
