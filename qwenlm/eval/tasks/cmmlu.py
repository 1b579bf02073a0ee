"""CMMLU (Li et al., 2023): 67 subjects of Chinese four-option questions.

Layout, as published: ``dev/SUBJECT.csv`` (5 examples, used as shots) and
``test/SUBJECT.csv``; CSV with a header ``,Question,A,B,C,D,Answer`` (the first column is a
row number). ``--data`` is the folder holding ``dev/`` and ``test/``.
"""

from __future__ import annotations

from qwenlm.eval.run import EvalError
from qwenlm.eval.tasks.choice import MultipleChoice, Question, find_split, read_csv, to_question

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
        test_dir = find_split(self.root, ("test",))
        if test_dir is None:
            raise EvalError(
                f"no test/ folder under {self.root}",
                hint="--data is the CMMLU folder holding dev/ and test/",
            )
        dev_dir = find_split(self.root, ("dev",))
        test, dev = {}, {}
        for path in sorted(test_dir.glob("*.csv")):
            subject = path.stem
            rows = read_csv(path, header=True, columns=COLUMNS)
            test[subject] = [
                to_question(r, subject, f"{subject}/{i}", f"{path}:{i + 2}")
                for i, r in enumerate(rows)
            ]
            dev_path = dev_dir / path.name if dev_dir else None
            if dev_path and dev_path.is_file():
                rows = read_csv(dev_path, header=True, columns=COLUMNS)
                dev[subject] = [
                    to_question(r, subject, f"{subject}/dev{i}", f"{dev_path}:{i + 2}")
                    for i, r in enumerate(rows)
                ]
        return test, dev
