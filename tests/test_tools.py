"""Parsing Qwen2.5 tool calls, the tool registry, and the calculator tool."""

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
from qwenlm.chat.tools import ToolCall, parse_tool_calls


def test_parse_single_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_parse_content_and_several_calls():
    text = (
        "Let me check both.\n"
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": [1, 2]}"}\n</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check both."
    assert [(c.name, c.arguments) for c in calls] == [("a", {"x": 1}), ("b", {"y": [1, 2]})]
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "a", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n["a"]\n</tool_call>',
        "<tool_call>",
        "plain text with </tool_call> only",
        "[" * 100_000,
    ],
)
def test_invalid_blocks_stay_content_and_never_raise(text):
    content, calls = parse_tool_calls(text)
    assert calls == [] and content == text


def test_mixed_valid_and_invalid_blocks():
    bad = "<tool_call>\n{oops\n</tool_call>"
    good = '<tool_call>\n{"name": "ok", "arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls(bad + "\n" + good)
    assert [c.name for c in calls] == ["ok"]
    assert content == bad


def test_unclosed_block_at_the_end_of_a_reply_is_parsed():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"q": "x"}}\n')
    assert calls and calls[0].arguments == {"q": "x"} and content == ""


def test_non_string_input():
    assert parse_tool_calls(None) == ("", [])  # type: ignore[arg-type]


def test_openai_form():
    call = ToolCall("f", {"q": "é"}, id="call_1")
    assert call.to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"q": "é"}'},
    }
    assert call.to_message() == {
        "type": "function",
        "function": {"name": "f", "arguments": {"q": "é"}},
    }


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
