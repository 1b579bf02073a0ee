"""Agents, HumanEval and the tool-use benchmark on the real default model (greedy decoding)."""

from __future__ import annotations

import gzip
import json

import pytest

from qwenlm.agent.code_interpreter import CodeInterpreter
from qwenlm.agent.function_calling import FunctionCallingAgent
from qwenlm.agent.tools import calculator_tool
from qwenlm.eval.run import EvalEngine, run_eval
from qwenlm.eval.tasks.humaneval import HumanEval, packaged_data
from qwenlm.eval.tasks.tooluse import ToolUse
from qwenlm.sandbox import _namespaces_work

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not _namespaces_work(), reason="unprivileged user namespaces unavailable"),
]

TWO_TOOL_TASK = (
    "Step 1: use the calculator tool to compute 1234 * 5678. "
    "Step 2: use the code_interpreter tool to run Python that prints how many digits that "
    "result has. Then tell me the product and the number of digits."
)


def test_agent_finishes_a_task_that_needs_two_tools(real_model):
    with CodeInterpreter() as interpreter:
        agent = FunctionCallingAgent(
            real_model, [calculator_tool(), interpreter.as_tool()], max_steps=5, max_new_tokens=200
        )
        result = agent.run(TWO_TOOL_TASK)
    observations = {s.tool: s.observation for s in result.tool_calls if not s.error}
    assert observations.get("calculator") == "7006652"
    assert observations.get("code_interpreter") == "stdout:\n7"
    assert result.finished
    answer = result.answer.replace(",", "")
    assert "7006652" in answer and "7" in answer.replace("7006652", "")


def test_humaneval_on_two_problems(real_model, tmp_path):
    with gzip.open(packaged_data(), "rt") as f:
        rows = [json.loads(line) for line in f]
    path = tmp_path / "two.jsonl"
    path.write_text(
        "".join(
            json.dumps(r) + "\n" for r in rows if r["task_id"] in ("HumanEval/0", "HumanEval/2")
        )
    )
    result = run_eval(real_model, HumanEval(path), progress=False)
    assert [r["status"] for r in result.records] == [["passed"], ["passed"]]
    assert result.metrics["pass@1"] == 1.0


def test_tooluse_benchmark_on_a_few_cases(real_model):
    task = ToolUse()
    samples = {s["id"]: s for s in task.load()}
    picked = [
        samples["t01"],
        samples["t02"],
        samples["t25"],
        samples["t26"],
    ]  # 2 need a tool, 2 do not
    records = task.evaluate(EvalEngine(real_model), picked)
    metrics = task.summarize(records)
    assert set(metrics) >= {"tool_selection_accuracy", "tool_input_rouge_l", "false_positive_rate"}
    assert records[0]["called"] == "calculator"
    assert records[2]["called"] is None  # "Hello! How are you today?" needs no tool
