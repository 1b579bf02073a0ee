"""Reasoning models: a reply that opens with ``<think>`` is split into reasoning and content.

DeepSeek-R1-Distill-Qwen, QwQ and Qwen3 think first, between ``<think>`` and ``</think>``, and
then answer. The split is what vLLM's and DeepSeek's APIs return as ``reasoning_content`` and
``content`` (Ollama's ``thinking`` and ``content``). Some templates open the ``<think>`` in the
prompt (DeepSeek-R1's, QwQ's): then the reply starts inside it. Only a reply that opens with
the tag, after whitespace, or a prompt that ends with it, counts: a ``<think>`` later in the
content is content. Newlines just inside the tags are dropped, as Qwen3's own template drops
them when it renders an earlier turn.

:class:`ThinkSplitter` decides from the text so far only, holding back what could still be the
start of a tag, so a streamed reply splits exactly as the same reply does in one piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qwenlm.serve.protocol import invalid

OPEN, CLOSE = "<think>", "</think>"
# The template's own variables: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)


# --reasoning-parser: auto (on when the chat template mentions <think>), think (on), none (off);
# vLLM's names for its Qwen-family parsers mean the same split here.
PARSERS = ("auto", "think", "none", "deepseek_r1", "qwen3")


def parser_enabled(choice: str, template_source: str) -> bool:
    """Whether replies are split, for ``--reasoning-parser`` ``choice`` and the chat template."""
    if choice not in PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(PARSERS)}, got {choice!r}")
    if choice == "auto":
        return OPEN in template_source  # a reasoning model's template writes or strips <think>
    return choice != "none"


def prompt_opens_thinking(tokenizer: Any, prompt: Sequence[int]) -> bool:
    """Whether the prompt ends inside ``<think>`` (the template opened it for the model)."""
    return tokenizer.decode(prompt[-16:]).rstrip().endswith(OPEN)


def _held(text: str) -> int:
    """Length of the tail of reasoning ``text`` that could still be newlines before ``</think>``."""
    best = 0
    for j in range(len(CLOSE)):
        if text.endswith(CLOSE[:j]):
            head = text[: len(text) - j]
            best = max(best, j + len(head) - len(head.rstrip("\n")))
    return best


class ThinkSplitter:
    """One choice's streamed text into (reasoning, content) deltas.

    ``thinking``: the prompt already opened ``<think>`` (see :func:`prompt_opens_thinking`).
    """

    def __init__(self, thinking: bool = False) -> None:
        self.mode = "reasoning" if thinking else "start"
        self.lead = thinking  # drop the newlines that open the current part
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that may be shown now."""
        self.buf += text
        reasoning = content = ""
        while self.buf:
            if self.mode == "start":
                s = self.buf.lstrip()
                if not s or (len(s) < len(OPEN) and OPEN.startswith(s)):
                    break  # whitespace or a partial tag: not decided yet
                if s.startswith(OPEN):
                    self.mode, self.lead, self.buf = "reasoning", True, s[len(OPEN) :]
                else:
                    self.mode = "content"
                continue
            if self.lead:
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    break
                self.lead = False
            if self.mode == "content":
                content += self.buf
                self.buf = ""
                break
            at = self.buf.find(CLOSE)
            if at >= 0:
                reasoning += self.buf[:at].rstrip("\n")
                self.mode, self.lead, self.buf = "content", True, self.buf[at + len(CLOSE) :]
                continue
            cut = len(self.buf) - _held(self.buf)
            reasoning += self.buf[:cut]
            self.buf = self.buf[cut:]
            break
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held once the reply has ended: a thought cut short stays reasoning."""
        rest, self.buf = self.buf, ""
        return (rest, "") if self.mode == "reasoning" else ("", rest)


def template_kwargs(value: Any, param: str = "chat_template_kwargs") -> dict[str, Any]:
    """``chat_template_kwargs``, checked: an object whose keys are not the template's own."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"Invalid '{param}': expected an object.", param=param)
    clash = sorted(RESERVED_TEMPLATE_VARS & set(value))
    if clash:
        raise invalid(
            f"Invalid '{param}': {', '.join(clash)} cannot be set here (the request's own "
            "fields set them).",
            param=param,
        )
    return dict(value)
