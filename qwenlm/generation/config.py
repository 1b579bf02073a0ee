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
        def bad(name: str, why: str) -> GenerationError:
            return GenerationError(f"{name} {why}, got {getattr(self, name)!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "must be a number")
            if not math.isfinite(value):
                raise bad(name, "must be finite")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
            return value

        if integer("max_new_tokens") < 1:
            raise bad("max_new_tokens", "must be a positive integer")
        if number("temperature") < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if integer("top_k") < 0:
            raise bad("top_k", "must be an integer >= 0 (0 turns it off)")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1] (0 turns it off)")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be a number > 0 (1.0 turns it off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not 0 <= integer("top_logprobs") <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in 0..{MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "needs logprobs=True")
        if self.seed is not None:
            integer("seed")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _bias(self.logit_bias))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors))
        if any(not callable(p) for p in self.logits_processors):
            raise bad("logits_processors", "must be callables (ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> GenerationConfig:
        return GenerationConfig(**{**self.__dict__, **changes})


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
