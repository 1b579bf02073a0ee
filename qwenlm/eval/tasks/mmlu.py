"""MMLU (Hendrycks et al., 2021): 57 subjects of four-option questions.

Layout, as published (``data.tar``): ``dev/SUBJECT_dev.csv`` (5 examples per subject, used as
shots) and ``test/SUBJECT_test.csv``; CSV without a header, columns
``question, A, B, C, D, answer``. ``--data`` is the folder holding ``dev/`` and ``test/``.
"""

from __future__ import annotations

from qwenlm.eval.run import EvalError
from qwenlm.eval.tasks.choice import MultipleChoice, Question, find_split, read_csv, to_question


class MMLU(MultipleChoice):
    name = "mmlu"

    def read(self) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
        test_dir = find_split(self.root, ("test",))
        if test_dir is None:
            raise EvalError(
                f"no test/ folder under {self.root}",
                hint="--data is the MMLU folder holding dev/ and test/",
            )
        dev_dir = find_split(self.root, ("dev",))
        test, dev = {}, {}
        for path in sorted(test_dir.glob("*_test.csv")):
            subject = path.name.removesuffix("_test.csv")
            rows = read_csv(path, header=False)
            test[subject] = [
                to_question(r, subject, f"{subject}/{i}", f"{path}:{i + 1}")
                for i, r in enumerate(rows)
            ]
            dev_path = dev_dir / f"{subject}_dev.csv" if dev_dir else None
            if dev_path and dev_path.is_file():
                rows = read_csv(dev_path, header=False)
                dev[subject] = [
                    to_question(r, subject, f"{subject}/dev{i}", f"{dev_path}:{i + 1}")
                    for i, r in enumerate(rows)
                ]
        return test, dev
