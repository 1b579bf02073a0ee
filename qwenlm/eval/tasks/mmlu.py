"""MMLU (Hendrycks et al., 2021): 57 subjects of four-option questions.

Layout, as published (``data.tar``): ``dev/SUBJECT_dev.csv`` (5 examples per subject, used as
shots) and ``test/SUBJECT_test.csv``; CSV without a header, columns
``question, A, B, C, D, answer``. ``--data`` is the folder holding ``dev/`` and ``test/``.
"""

from __future__ import annotations

from qwenlm.eval.tasks.choice import MultipleChoice, Question, read_subjects


class MMLU(MultipleChoice):
    name = "mmlu"

    def read(self) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
        return read_subjects(self.root, "MMLU", "test", ("_test.csv", "_dev.csv"), header=False)
