"""Errors that reach users: one line naming the problem, plus a hint naming the fix."""

from __future__ import annotations

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
