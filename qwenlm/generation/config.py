"""How to generate: one frozen config that every surface fills in and the sampler reads."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwenlm.errors import GenerationError

LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]
"""A hook on the sampler: ``(token ids generated so far, logits (vocab,)) -> logits``.

Runs before the penalties and filters; it may mask tokens (set them to -inf), as constrained
decoding does. It must be a function of its arguments: speculative decoding calls it on rows
of drafts that may be rejected, always with the ids that precede that row."""

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``temperature=0`` is greedy decoding.

    Defaults are the sampling settings Qwen2.5's instruct models ship with. Filters apply in
    the order temperature, top-k, top-p, min-p; penalties before them: ``repetition_penalty``
    (CTRL's, on every token of prompt and output), ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's, on output tokens), ``logit_bias`` ({token id: bias}).
    ``logprobs`` asks for the chosen tokens' log-probabilities under the model (before any
    sampling setting) and ``top_logprobs`` for that many alternatives.
    """

    max_new_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    repetition_penalty: float = 1.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's end-of-turn ids
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logits_processors: tuple[LogitsProcessor, ...] = ()

    def __post_init__(self) -> None:
        for name, (kind, ok, why) in _RANGES.items():
            value = getattr(self, name)
            if not _is_number(value, kind) or not ok(value):
                raise _bad(name, value, why)
        if self.top_logprobs and not self.logprobs:
            raise _bad("top_logprobs", self.top_logprobs, "needs logprobs=True")
        if self.seed is not None and not _is_number(self.seed, int):
            raise _bad("seed", self.seed, "must be an integer")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise _bad("stop", self.stop, "must be non-empty strings")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _bias(self.logit_bias))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors))
        if any(not callable(p) for p in self.logits_processors):
            raise _bad(
                "logits_processors",
                self.logits_processors,
                "must be callables (ids, logits) -> logits",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> GenerationConfig:
        return GenerationConfig(**{**self.__dict__, **changes})


# The numeric fields: (int or float, the valid range, what the error says).
_RANGES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "max_new_tokens": (int, lambda v: v >= 1, "must be a positive integer"),
    "temperature": (float, lambda v: v >= 0, "must be a finite number >= 0 (0 is greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "must be an integer >= 0 (0 turns it off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "must be in [0, 1] (0 turns it off)"),
    "repetition_penalty": (float, lambda v: v > 0, "must be a number > 0 (1.0 turns it off)"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    "top_logprobs": (
        int,
        lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
        f"must be in 0..{MAX_TOP_LOGPROBS}",
    ),
}


def _is_number(value: Any, kind: type) -> bool:
    """An int (for ``kind`` int), or a finite int or float (for float); never a bool."""
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _bad(name: str, value: Any, why: str) -> GenerationError:
    return GenerationError(f"{name} {why}, got {value!r}")


def _bias(value: Mapping[Any, Any]) -> dict[int, float]:
    out = {}
    for k, v in dict(value).items():
        try:
            token, bias = int(k), float(v)
        except (TypeError, ValueError):
            raise GenerationError(
                f"logit_bias maps token ids to numbers, got {k!r}: {v!r}"
            ) from None
        if token < 0 or not math.isfinite(bias):
            raise GenerationError(f"logit_bias: bad entry {k!r}: {v!r}")
        out[token] = bias
    return out
