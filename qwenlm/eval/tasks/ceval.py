"""C-Eval (Huang et al., 2023): 52 subjects of Chinese exam questions.

Layout, as published (``ceval-exam.zip``): ``dev/SUBJECT_dev.csv`` (5 examples with
explanations, used as shots), ``val/SUBJECT_val.csv`` (scored here: the test split's answers
are not public) and ``test/``. CSV with a header: ``id, question, A, B, C, D, answer``
(``explanation`` in dev). ``--data`` is the folder holding ``dev/`` and ``val/``.
"""

from __future__ import annotations

from qwenlm.eval.tasks.choice import MultipleChoice, Question, read_subjects


class CEval(MultipleChoice):
    name = "ceval"
    header = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    answer_prefix = "答案："
    letter_spacing = ""
    chat_instruction = (
        "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案，先回答选项字母。\n\n{body}"
    )

    def read(self) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
        suffixes = ("_val.csv", "_dev.csv")
        return read_subjects(self.root, "C-Eval", "val", suffixes, header=True, id_column="id")
