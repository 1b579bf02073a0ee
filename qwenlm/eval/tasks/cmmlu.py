"""CMMLU (Li et al., 2023): 67 subjects of Chinese four-option questions.

Layout, as published: ``dev/SUBJECT.csv`` (5 examples, used as shots) and
``test/SUBJECT.csv``; CSV with a header ``,Question,A,B,C,D,Answer`` (the first column is a
row number). ``--data`` is the folder holding ``dev/`` and ``test/``.
"""

from __future__ import annotations

from qwenlm.eval.tasks.choice import MultipleChoice, Question, read_subjects

COLUMNS = {"Question": "question", "Answer": "answer"}


class CMMLU(MultipleChoice):
    name = "cmmlu"
    header = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
    answer_prefix = "答案是："
    letter_spacing = ""
    chat_instruction = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项字母。\n\n{body}"

    def body(self, q: Question) -> str:
        return "题目：" + super().body(q)

    def read(self) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
        return read_subjects(
            self.root, "CMMLU", "test", (".csv", ".csv"), header=True, columns=COLUMNS
        )
