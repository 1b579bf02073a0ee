"""The tool-use benchmark: its data set, reader and the model-card metrics."""

from __future__ import annotations

import json

import pytest
from helpers import ScriptedEngine

from qwenlm.eval.run import EvalError
from qwenlm.eval.tasks.tooluse import DEFAULT_DATA, ToolUse


def test_shipped_set_is_well_formed():
    samples = ToolUse().load()
    assert len(samples) == 36
    need = [s for s in samples if s["expected"]]
    assert len(need) == 24 and len(samples) - len(need) == 12
    data = json.loads(DEFAULT_DATA.read_text())
    names = {t["function"]["name"] for t in data["tools"]}
    assert {s["expected"]["name"] for s in need} <= names


def test_metrics():
    task = ToolUse()
    samples = task.load()
    weather = next(s for s in samples if s["id"] == "t02")  # get_weather, city Tokyo
    calc = next(s for s in samples if s["id"] == "t01")  # calculator 1234 * 5678
    hello = next(s for s in samples if s["query"].startswith("Hello"))
    haiku = next(s for s in samples if "haiku" in s["query"])
    replies = {
        weather[
            "query"
        ]: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>',
        calc[
            "query"
        ]: '```json\n{"name": "search_web", "arguments": {"query": "1234 * 5678"}}\n```',
        hello["query"]: "Hello! I am fine.",
        haiku[
            "query"
        ]: '<tool_call>\n{"name": "search_web", "arguments": {"query": "haiku"}}\n</tool_call>',
    }
    engine = ScriptedEngine(reply=lambda prompt: next(v for k, v in replies.items() if k in prompt))
    records = task.evaluate(engine, [weather, calc, hello, haiku])
    metrics = task.summarize(records)
    assert metrics["tool_selection_accuracy"] == 0.5
    # Tokyo: exact arguments; calculator case: wrong tool, partly matching input
    assert records[0]["input_rouge_l"] == 1.0 and 0 < records[1]["input_rouge_l"] < 1
    assert metrics["false_positive_rate"] == 0.5
    assert metrics["tagged_call_rate"] == pytest.approx(2 / 3)  # a float64 ratio of counts


def test_react_method_parses_actions():
    task = ToolUse(method="react")
    samples = task.load()[:1]
    engine = ScriptedEngine(
        reply=lambda _: (
            'Thought: multiply\nAction: calculator\nAction Input: {"expression": "1234 * 5678"}\n'
        )
    )
    records = task.evaluate(engine, samples)
    assert records[0]["selection_correct"] and records[0]["input_rouge_l"] == 1.0
    assert "Action Input:" in engine.prompts[0]


def test_bad_data(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps({"tools": [], "cases": [{"id": "1", "query": "q", "tools": ["nope"]}]})
    )
    with pytest.raises(EvalError, match="undefined tool"):
        ToolUse(path).load()
    with pytest.raises(EvalError, match="unknown tool-use method"):
        ToolUse(method="guess")
