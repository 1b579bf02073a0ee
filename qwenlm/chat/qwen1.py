"""Qwen1's chat prompt: ChatML built piece by piece, as the Qwen1 model card's ``make_context``.

Qwen1 checkpoints carry no Jinja template; their ``chat()`` tokenizes each role name, newline
and message on its own, uses the system prompt "You are a helpful assistant." unless given
another, and drops the oldest (query, response) turns that would make the history reach
``max_window_size`` tokens (6144 in Qwen-7B-Chat's generation config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qwenlm.chat.template import CHATML_TEMPLATE, ChatTemplate, Message, normalize_messages
from qwenlm.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."


class Qwen1ChatTemplate(ChatTemplate):
    """ChatML with Qwen1's tokenization and history window; other uses render as ChatML."""

    def __init__(self, tokenizer: Tokenizer, max_window_size: int = 6144) -> None:
        super().__init__(CHATML_TEMPLATE, tokenizer)
        self.max_window_size = max_window_size

    def encode(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        msgs = normalize_messages(messages)
        system = DEFAULT_SYSTEM
        if msgs[0]["role"] == "system":
            system, msgs = msgs[0]["content"], msgs[1:]
        roles = [m["role"] for m in msgs]
        pairs = len(roles) // 2
        chat_shaped = roles == ["user", "assistant"] * pairs + ["user"]
        if tools or kwargs or not add_generation_prompt or not chat_shaped:
            return super().encode(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
            )
        history = [(msgs[2 * i]["content"], msgs[2 * i + 1]["content"]) for i in range(pairs)]
        return self.make_context(msgs[-1]["content"], history, system)

    def make_context(
        self, query: str, history: Sequence[tuple[str, str]] = (), system: str = DEFAULT_SYSTEM
    ) -> list[int]:
        """Prompt ids for ``query`` after ``history``, exactly as Qwen1's ``make_context``."""
        tok = self.tokenizer
        im_start = [tok.special_tokens["<|im_start|>"]]
        im_end = [tok.special_tokens["<|im_end|>"]]
        nl = tok.encode("\n")

        def turn(role: str, content: str) -> list[int]:
            return im_start + tok.encode(role) + nl + tok.encode(content) + im_end

        system_ids = turn("system", system)
        context: list[int] = []
        for q, r in reversed(history):
            block = nl + turn("user", q) + nl + turn("assistant", r)
            if len(system_ids) + len(block) + len(context) >= self.max_window_size:
                break  # this turn and every older one fall out of the window
            context = block + context
        return (
            system_ids
            + context
            + nl
            + turn("user", query)
            + nl
            + im_start
            + tok.encode("assistant")
            + nl
        )
