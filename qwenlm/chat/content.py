"""OpenAI-style message content: a string, or a list of ``{"type": "text", "text": ...}`` parts.

One reading of content parts for the chat template, the server's request checks and training
data; each reports a bad part in its own words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class NonTextPart(ValueError):
    """A content part that is not ``{"type": "text", "text": str}``; ``index`` says which."""

    def __init__(self, index: int) -> None:
        super().__init__(f"content part {index} is not a text part")
        self.index = index


def join_text_parts(parts: Sequence[Any]) -> str:
    """The texts of content ``parts``, joined; raises :class:`NonTextPart` at any other part."""
    texts = []
    for i, part in enumerate(parts):
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            raise NonTextPart(i)
        texts.append(part["text"])
    return "".join(texts)
