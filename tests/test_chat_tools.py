"""Parsing Qwen2.5 tool calls out of a reply (qwenlm.chat.tools)."""

from __future__ import annotations

import pytest

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
