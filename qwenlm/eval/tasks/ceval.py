"""C-Eval (Huang et al., 2023): 52 subjects of Chinese exam questions.

Layout, as published (``ceval-exam.zip``): ``dev/SUBJECT_dev.csv`` (5 examples with
explanations, used as shots), ``val/SUBJECT_val.csv`` (scored here: the test split's answers
are not public) and ``test/``. CSV with a header: ``id, question, A, B, C, D, answer``
(``explanation`` in dev). ``--data`` is the folder holding ``dev/`` and ``val/``.
"""

from __future__ import annotations

from qwenlm.eval.run import EvalError
from qwenlm.eval.tasks.choice import MultipleChoice, Question, find_split, read_csv, to_question


class CEval(MultipleChoice):
    name = "ceval"
    header = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    answer_prefix = "答案："
    letter_spacing = ""
    chat_instruction = (
        "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案，先回答选项字母。\n\n{body}"
    )

    def read(self) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
        val_dir = find_split(self.root, ("val",))
        if val_dir is None:
            raise EvalError(
                f"no val/ folder under {self.root}",
                hint="--data is the C-Eval folder holding dev/ and val/",
            )
        dev_dir = find_split(self.root, ("dev",))
        test, dev = {}, {}
        for path in sorted(val_dir.glob("*_val.csv")):
            subject = path.name.removesuffix("_val.csv")
            rows = read_csv(path, header=True)
            test[subject] = [
                to_question(r, subject, f"{subject}/{r.get('id', i)}", f"{path}:{i + 2}")
                for i, r in enumerate(rows)
            ]
            dev_path = dev_dir / f"{subject}_dev.csv" if dev_dir else None
            if dev_path and dev_path.is_file():
                rows = read_csv(dev_path, header=True)
                dev[subject] = [
                    to_question(r, subject, f"{subject}/dev{i}", f"{dev_path}:{i + 2}")
                    for i, r in enumerate(rows)
                ]
        return test, dev
