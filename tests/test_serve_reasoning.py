"""Reasoning replies: ``<think>`` split into reasoning and content, streamed exactly as not.

The splitter is checked on hand-written replies cut at every chunking; the server on a tiny
scripted model (its logits spell a fixed reply after the prompt), through the OpenAI route
(``reasoning_content``) and Ollama's (``thinking``), and ``chat_template_kwargs`` reaching the
chat template.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")

import httpx
import torch
from helpers import QWEN_TEMPLATE, tiny_config, tiny_model, tiny_tokenizer
from serve_helpers import LiveServer

from qwenlm.api import Qwen
from qwenlm.chat.template import ChatTemplate
from qwenlm.models.qwen2 import Qwen2ForCausalLM
from qwenlm.serve import ServeConfig
from qwenlm.serve.protocol import APIError
from qwenlm.serve.reasoning import (
    ThinkSplitter,
    parser_enabled,
    prompt_opens_thinking,
    template_kwargs,
)

REPLIES = [
    # (reply, prompt opened <think>, reasoning, content)
    ("<think>\nI reason.\n\n</think>\n\nThe answer.", False, "I reason.", "The answer."),
    ("  <think>a</think>b", False, "a", "b"),
    ("<think>cut short\n", False, "cut short\n", ""),
    ("plain <think> text", False, "", "plain <think> text"),
    ("\n\nhello", False, "", "\n\nhello"),
    ("<thin", False, "", "<thin"),
    ("reasoning only\n</think>\n\nanswer\n", True, "reasoning only", "answer\n"),
    ("a\n</b\n</think>c", True, "a\n</b", "c"),
    ("x</think>y</think>z", True, "x", "y</think>z"),
    ("", False, "", ""),
]


def split(text: str, opened: bool, sizes: list[int]) -> tuple[list[str], list[str]]:
    s = ThinkSplitter(opened)
    reasoning, content, at = [], [], 0
    for k in sizes:
        r, c = s.feed(text[at : at + k])
        reasoning.append(r)
        content.append(c)
        at += k
    r, c = s.finish()
    return [*reasoning, r], [*content, c]


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), REPLIES)
def test_the_split_does_not_depend_on_the_chunking(text, opened, reasoning, content):
    rng = random.Random(0)
    whole = split(text, opened, [len(text)])
    assert ("".join(whole[0]), "".join(whole[1])) == (reasoning, content)
    for _ in range(200):
        sizes = []
        while sum(sizes) < len(text):
            sizes.append(rng.randint(1, 4))
        r, c = split(text, opened, sizes)
        assert ("".join(r), "".join(c)) == (reasoning, content)
        first_content = next((i for i, x in enumerate(c) if x), len(c))
        assert not any(r[first_content + 1 :]), "reasoning after content"


def test_parser_choice_and_template_kwargs():
    assert parser_enabled("auto", "... <think> ...") and not parser_enabled("auto", "plain")
    assert parser_enabled("think", "plain") and parser_enabled("deepseek_r1", "plain")
    assert not parser_enabled("none", "<think>")
    with pytest.raises(ValueError, match="reasoning_parser"):
        parser_enabled("r1", "")
    tok = tiny_tokenizer()
    assert prompt_opens_thinking(tok, tok.encode("Hi.\nassistant\n<think>\n"))
    assert not prompt_opens_thinking(tok, tok.encode("assistant\n<think>\n\n</think>\n\n"))
    assert template_kwargs({"enable_thinking": False}) == {"enable_thinking": False}
    for bad in ([1], {"messages": []}, {"add_generation_prompt": False}):
        with pytest.raises(APIError) as e:
            template_kwargs(bad)
        assert e.value.status == 400 and e.value.param == "chat_template_kwargs"


# -- a scripted model behind the server --------------------------------------------------------
class Scripted(Qwen2ForCausalLM):
    """A tiny model whose logits write ``reply`` after a prompt of ``start`` tokens, then stop."""

    reply: list[int]
    start: int
    stop: int

    def forward(self, input_ids, cache=None, *, positions=None, logits_at=None, **kw):
        logits = super().forward(input_ids, cache, positions=positions, logits_at=logits_at, **kw)
        pos = positions[0] if logits_at is None else positions[0, logits_at]
        out = torch.full_like(logits, -30.0)
        for i, p in enumerate(pos.reshape(-1).tolist()):
            k = p + 1 - self.start
            out[0, i, self.reply[k] if 0 <= k < len(self.reply) else self.stop] = 0.0
        return out


THINKING_TEMPLATE = QWEN_TEMPLATE + (
    # Qwen3's switch: with enable_thinking false the template writes an empty thought itself.
    "{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def scripted():
    tok = tiny_tokenizer()
    model = tiny_model(tiny_config(num_hidden_layers=1))
    model.__class__ = Scripted
    model.stop = tok.special_tokens["<|im_end|>"]
    qwen = Qwen(model, tok, ChatTemplate(THINKING_TEMPLATE, tok), name="tiny-r1")

    def script(reply: str, messages=MESSAGES, **template_kwargs) -> None:
        model.reply = tok.encode_with_special(reply)
        model.start = len(qwen.encode_chat(messages, **template_kwargs))

    with LiveServer(qwen, ServeConfig(prefill_chunk=32, tool_prompt="native")) as server:
        assert server.service.reasoning  # the template mentions <think>
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client, script


def openai_chat(client, stream: bool, **extra):
    body = {"model": "tiny-r1", "messages": MESSAGES, "temperature": 0, "stream": stream}
    r = client.post("/v1/chat/completions", json={**body, **extra})
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]
    deltas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return [d["choices"][0]["delta"] for d in deltas if d["choices"]]


def test_openai_route_streams_reasoning_then_content(scripted):
    client, script = scripted
    script("<think>\nFour, since 2 + 2 = 4.\n</think>\n\nThe answer is 4.")
    whole = openai_chat(client, stream=False)
    assert whole["reasoning_content"] == "Four, since 2 + 2 = 4."
    assert whole["content"] == "The answer is 4."
    deltas = openai_chat(client, stream=True)
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=["reasoning_content", "content"].index)  # thought first
    assert len([k for k in kinds if k == "reasoning_content"]) > 1  # it streams, in pieces
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == whole["content"]


def test_a_reply_without_a_thought_is_all_content(scripted):
    client, script = scripted
    script("Just 4.")
    whole = openai_chat(client, stream=False)
    assert whole["reasoning_content"] is None and whole["content"] == "Just 4."


def test_chat_template_kwargs_reach_the_template(scripted):
    client, script = scripted
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    script("Four.", enable_thinking=False)
    r = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-r1", "messages": MESSAGES, "temperature": 0, **off},
    )
    plain = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-r1", "messages": MESSAGES, "temperature": 0, "max_tokens": 1},
    )
    # the template wrote the empty thought into the prompt, so the reply is all content
    assert r.json()["choices"][0]["message"]["content"] == "Four."
    assert r.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
    bad = {"model": "tiny-r1", "messages": MESSAGES, "chat_template_kwargs": {"tools": []}}
    r = client.post("/v1/chat/completions", json=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_ollama_think_and_thinking(scripted):
    client, script = scripted
    script("<think>\nAdd them.\n</think>\n\n4", enable_thinking=True)
    body = {"model": "tiny-r1", "messages": MESSAGES, "think": True, "options": {"temperature": 0}}
    whole = client.post("/api/chat", json={**body, "stream": False}).json()
    assert whole["message"] == {"role": "assistant", "content": "4", "thinking": "Add them."}
    lines = [json.loads(x) for x in client.post("/api/chat", json=body).text.splitlines()]
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"
    msgs = [x["message"] for x in lines[:-1]]
    assert "".join(m.get("thinking", "") for m in msgs) == "Add them."
    assert "".join(m["content"] for m in msgs) == "4"
    last_thought = max(i for i, m in enumerate(msgs) if m.get("thinking"))
    assert not any(m["content"] for m in msgs[: last_thought + 1])
    r = client.post("/api/generate", json={**body, "think": "high", "prompt": "x"})
    assert r.status_code == 400 and "think" in r.json()["error"]


def test_ollama_tool_calls_have_ollamas_shape(scripted):
    client, script = scripted
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    script('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>')
    body = {"model": "tiny-r1", "messages": MESSAGES, "tools": tools, "stream": False}
    message = client.post("/api/chat", json={**body, "options": {"temperature": 0}}).json()
    assert message["message"]["tool_calls"] == [
        {"function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    ]
    assert message["done_reason"] == "stop"
    # the call and its result go back in Ollama's shape (arguments an object, tool_name)
    history = [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": message["message"]["tool_calls"]},
        {"role": "tool", "content": "4", "tool_name": "add"},
    ]
    script("It is 4.", messages=[*MESSAGES, {"role": "assistant", "content": ""}, history[-1]])
    r = client.post("/api/chat", json={**body, "messages": history, "options": {"temperature": 0}})
    assert r.status_code == 200 and r.json()["message"]["content"] == "It is 4."
