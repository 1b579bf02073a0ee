"""The tool registry and the calculator tool (qwenlm.agent.tools)."""

from __future__ import annotations

import json

import pytest

from qwenlm.agent.tools import (
    Tool,
    ToolError,
    ToolRegistry,
    calculate,
    calculator_tool,
    check_arguments,
)


# -- registry ---------------------------------------------------------------------------------
def make_registry() -> ToolRegistry:
    tools = ToolRegistry()

    @tools.register(
        description="Repeat a word",
        parameters={
            "type": "object",
            "properties": {
                "word": {"type": "string"},
                "times": {"type": "integer"},
                "sep": {"type": "string", "enum": [",", " "]},
            },
            "required": ["word"],
        },
    )
    def repeat(word: str, times: int = 2, sep: str = " ") -> str:
        return sep.join([word] * times)

    @tools.register(description="Always fails", parameters={"type": "object", "properties": {}})
    def broken() -> str:
        raise RuntimeError("disk on fire")

    return tools


def test_registry_calls_and_schemas():
    tools = make_registry()
    assert tools.names == ["repeat", "broken"]
    assert tools.schemas()[0]["function"]["name"] == "repeat"
    assert tools.call("repeat", {"word": "hi", "times": 3}).text == "hi hi hi"
    assert tools.call("repeat", '{"word": "a", "sep": ","}').text == "a,a"


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("nope", {}, "no tool named 'nope'"),
        ("repeat", {}, "missing required argument(s): word"),
        ("repeat", {"word": 5}, "'word' must be string"),
        ("repeat", {"word": "a", "times": True}, "'times' must be integer"),
        ("repeat", {"word": "a", "sep": "-"}, "must be one of"),
        ("repeat", "{bad json", "not valid JSON"),
        ("repeat", ["word"], "must be a JSON object"),
        ("broken", {}, "RuntimeError: disk on fire"),
    ],
)
def test_tool_errors_become_error_results(name, args, message):
    r = make_registry().call(name, args)
    assert r.error and r.text.startswith("error:") and message in r.text


def test_registry_rejects_bad_tools():
    with pytest.raises(ToolError):
        ToolRegistry([Tool("bad name!", "", {"type": "object"}, lambda: "")])
    with pytest.raises(ToolError):
        ToolRegistry([Tool("t", "", {"type": "array"}, lambda: "")])


def test_check_arguments_additional_properties():
    with pytest.raises(ToolError, match="unknown argument"):
        check_arguments(
            {"type": "object", "properties": {}, "additionalProperties": False}, {"x": 1}
        )


# -- calculator -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expr, value",
    [
        ("1 + 2 * 3", "7"),
        ("(17.5 + 42.25) / 3", "19.916666666666668"),
        ("2 ** 10", "1024"),
        ("2^3", "8"),
        ("sqrt(7921)", "89"),
        ("-5 // 2", "-3"),
        ("factorial(5)", "120"),
        ("pi * 2", str(3.141592653589793 * 2)),
    ],
)
def test_calculator(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "1/0",
        "2 ** 100000",
        "factorial(100000)",
        "x + 1",
        "1 +",
    ],
)
def test_calculator_refuses(expr):
    with pytest.raises(ToolError):
        calculate(expr)


def test_calculator_tool_reports_errors_as_observations():
    tools = ToolRegistry([calculator_tool()])
    assert tools.call("calculator", {"expression": "6 * 7"}).text == "42"
    r = tools.call("calculator", {"expression": "1/0"})
    assert r.error and "division by zero" in r.text
    assert json.loads(json.dumps(tools.schemas()))[0]["function"]["parameters"]["required"] == [
        "expression"
    ]
