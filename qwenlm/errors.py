"""Errors that reach users: one line naming the problem, plus a hint naming the fix."""

from __future__ import annotations

import os
from typing import Any


def json_type(value: Any) -> str:
    """How a parsed JSON value's type reads in an error message: "an array", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class QwenlmError(Exception):
    """Base class for every error qwenlm reports to a user.

    The CLI prints ``message`` and ``hint`` and exits without a traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ModelNotFoundError(QwenlmError):
    """A model name or path that does not resolve to a checkpoint."""


class PullError(QwenlmError):
    """Fetching or verifying a registry model failed."""


class CheckpointError(QwenlmError):
    """A checkpoint (GGUF file, safetensors, config.json) is malformed or unsupported."""


class TokenizerError(QwenlmError):
    """A tokenizer definition is malformed, or input cannot be encoded."""


class ChatTemplateError(QwenlmError):
    """A chat template failed to render, or the conversation is malformed."""


class GenerationError(QwenlmError):
    """Invalid generation settings or a prompt that does not fit the context."""


def debug_tracebacks() -> bool:
    """Whether ``QWENLM_DEBUG`` asks for full tracebacks (on the console and in server logs)."""
    return bool(os.environ.get("QWENLM_DEBUG"))


def loggable(text: object, limit: int = 200) -> str:
    """``text`` fit for one log line: control characters (CR, LF, ESC ...) escaped, so a value
    a client sent cannot forge log lines or terminal escapes; cut at ``limit`` characters."""
    s = str(text)
    s = s if len(s) <= limit else s[:limit] + "..."
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)
