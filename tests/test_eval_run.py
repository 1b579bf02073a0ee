"""The evaluation harness with a real (tiny, random) model: engine, resume, perplexity, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_float32_close,
    float64_logits,
    tiny_config,
    tiny_qwen,
)

from qwenlm.api import Qwen
from qwenlm.eval.perplexity import Perplexity
from qwenlm.eval.run import EvalEngine, EvalError, Request, run_eval
from qwenlm.eval.scoring import (
    extract_choice,
    extract_code,
    extract_number,
    last_boxed,
    math_equal,
    pass_at_k,
    rouge_l,
)
from qwenlm.eval.tasks import make_task

DATA = Path(__file__).parent / "data" / "eval"


@pytest.fixture(scope="module")
def qwen() -> Qwen:
    # The tiny vocabulary spends about a token per byte: few-shot prompts need a longer context.
    return tiny_qwen(tiny_config(max_position_embeddings=4096))


def test_engine_completions_equal_plain_greedy_generation(qwen):
    engine = EvalEngine(qwen)
    prompts = [
        engine.text_prompt("hello world"),
        engine.text_prompt("hello wor"),
        engine.chat_prompt([{"role": "user", "content": "hi"}]),
    ]
    outs = engine.complete([Request(p, max_new_tokens=12) for p in prompts])
    for p, out in zip(prompts, outs, strict=True):
        expected = qwen.generate(
            list(p), temperature=0, max_new_tokens=12, repetition_penalty=1.0, top_k=0, top_p=1.0
        )
        assert out.text == expected and out.prompt_tokens == len(p)


def test_next_token_logprobs_equal_a_full_forward(qwen):
    engine = EvalEngine(qwen)
    prompts = [
        engine.text_prompt("hello world hello"),
        engine.text_prompt("hello world in"),
        engine.text_prompt("he"),
    ]
    candidates = [10, 20, 30]
    got = engine.next_token_logprobs(prompts, candidates)  # later prompts reuse cached prefixes
    for p, row in zip(prompts, got, strict=True):
        ref = torch.log_softmax(qwen.logits(list(p))[-1], -1)[candidates]
        exact = torch.log_softmax(float64_logits(qwen.model, torch.tensor([p]))[0, -1], -1)
        # a cached prefix sums in another order: float32 noise of the full forward (log_softmax
        # moves every logit by the same logsumexp, so its error is of the logits' size)
        assert_float32_close(torch.tensor(row), ref, exact[candidates])


def test_run_eval_records_and_resumes(qwen, tmp_path):
    task = make_task("gsm8k", str(DATA / "gsm8k.jsonl"), mode="base", shots=1, max_new_tokens=4)
    out = tmp_path / "run"
    first = run_eval(qwen, task, output=out, limit=2, progress=False, batch_size=1)
    assert [r["id"] for r in first.records] == ["1", "2"]
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # An interrupted write leaves a partial line: it is dropped and that sample runs again.
    (out / "records.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    second = run_eval(qwen, task, output=out, progress=False)
    assert [r["id"] for r in second.records] == ["1", "2", "3"]
    assert second.records[0] == first.records[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 3 and "accuracy" in summary["metrics"]
    assert "gsm8k" in second.table() and "accuracy" in second.table()


def test_resume_refuses_other_settings(qwen, tmp_path):
    out = tmp_path / "run"
    run_eval(
        qwen,
        make_task("gsm8k", str(DATA / "gsm8k.jsonl"), mode="base", shots=1, max_new_tokens=2),
        output=out,
        limit=1,
        progress=False,
    )
    other = make_task("gsm8k", str(DATA / "gsm8k.jsonl"), mode="base", shots=2, max_new_tokens=2)
    with pytest.raises(EvalError, match="other settings"):
        run_eval(qwen, other, output=out, limit=1, progress=False)
    assert (
        len(run_eval(qwen, other, output=out, limit=1, restart=True, progress=False).records) == 1
    )


def test_multiple_choice_base_mode_on_a_real_model(qwen):
    task = make_task("mmlu", str(DATA / "mmlu"), mode="base")
    result = run_eval(qwen, task, progress=False)
    assert len(result.records) == 4
    for r in result.records:
        assert r["prediction"] in "ABCD" and len(r["logprobs"]) == 4
        assert all(x <= 0 for x in r["logprobs"])


def test_perplexity_windows_cover_every_token_once():
    task = Perplexity(DATA / "ppl.txt", context=8, stride=3)
    windows = task.windows(20)
    scored = [i for start, end, first in windows for i in range(start + first, end)]
    assert scored == list(range(1, 20))
    assert all(end - start <= 8 for start, end, _ in windows)


def test_perplexity_equals_direct_computation(qwen):
    task = Perplexity(DATA / "ppl.txt", context=4096)
    result = run_eval(qwen, task, progress=False)
    ids = qwen.tokenizer.encode((DATA / "ppl.txt").read_text())
    logprobs = torch.log_softmax(qwen.logits(ids)[:-1], -1)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    # Another batching of the same tokens: float32 noise (~1e-5 per token's nll, see
    # test_models_qwen2) moves the mean by as much, and exp() makes that ~1e-5 relative; 1e-4
    # leaves 10x.
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert result.metrics["tokens"] == len(ids) - 1
    strided = run_eval(qwen, Perplexity(DATA / "ppl.txt", context=16, stride=8), progress=False)
    assert strided.metrics["perplexity"] > 1


def test_perplexity_errors(tmp_path):
    with pytest.raises(EvalError, match="needs a text file"):
        Perplexity(None)
    with pytest.raises(EvalError, match="stride"):
        Perplexity(tmp_path, context=8, stride=8)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(EvalError, match="not UTF-8"):
        Perplexity(tmp_path / "bin.txt").load()


# -- scoring helpers --------------------------------------------------------------------------
def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    # float64 formulas on small integers: pytest.approx's default 1e-6 (also for rouge_l)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)


def test_answer_extraction():
    assert extract_number("so 3 + 4 = 7 apples\n#### 7") == "7"
    assert extract_number("The answer is $1,234.50.") == "1234.5"
    assert extract_number("first 3 then 12") == "12"
    assert extract_number("no numbers") is None
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert math_equal("\\dfrac{1}{2}", "\\frac12") and math_equal("0.5", "\\frac{1}{2}")
    assert (
        math_equal("5\\text{ units}", "5")
        and math_equal("90^\\circ", "90")
        and math_equal("x = 3", "3")
    )
    assert not math_equal("3", "4") and not math_equal(None, "4")
    assert extract_choice("答案：C") == "C" and extract_choice("The correct answer is (D)") == "D"
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1"
    assert extract_code("```python\nunclosed = 1\n") == "unclosed = 1\n"


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0
    assert rouge_l("the cat", "the dog") == pytest.approx(0.5)
    assert rouge_l("北京天气", "北京的天气") == pytest.approx(2 * 1.0 * 0.8 / 1.8)


# -- CLI --------------------------------------------------------------------------------------
def test_cli_reports_bad_data_without_a_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwenlm",
            "eval",
            "--task",
            "gsm8k",
            "--data",
            str(tmp_path / "none.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        r.returncode == 1 and "error: no such data file" in r.stderr and "Traceback" not in r.stderr
    )
    r = subprocess.run(
        [sys.executable, "-m", "qwenlm", "eval", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "humaneval" in r.stdout and "--limit" in r.stdout
