"""Tokens to text: one sequence's sampled ids become text deltas, stop rules applied.

:class:`TextStream` is the only place that decides when generation stops (end-of-turn tokens,
stop strings, the length limit) and what text is released: stop strings are never shown, not
even in part, and multibyte characters split over tokens come out whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from qwenlm.errors import GenerationError
from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.sampling import TokenLogprob
from qwenlm.tokenizer import Tokenizer


@dataclass
class GenerationChunk:
    """One step of a text stream: new text, the tokens behind it, and at the end why it ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # of ``token_ids``, when asked for


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


def _held_back(text: str, stops: Seq[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """One sequence's sampled tokens -> text deltas, with stop tokens, stop strings and a limit.

    Stop strings are never emitted, not even in part: text that could be the start of one is
    held back until it either completes the stop string (generation ends) or cannot. Without
    a tokenizer the stream is of token ids only: every token comes out at once, with no text.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        config: GenerationConfig,
        prompt_tokens: int,
        max_new_tokens: int,
    ) -> None:
        self.config = config
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        stop_ids = config.stop_token_ids
        if stop_ids is None:
            stop_ids = tokenizer.stop_token_ids if tokenizer is not None else ()
        self.stop_ids = set() if config.ignore_eos else set(stop_ids)
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.pending = ""  # decoded text not yet emitted (may hold the start of a stop string)
        self.ids: list[int] = []  # tokens behind `pending`
        self.logprobs: list[TokenLogprob] = []  # of `ids`, when the sampler gives them
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def push(self, token: int, logprob: TokenLogprob | None = None) -> GenerationChunk | None:
        """Take one sampled token; returns a chunk when there is text to release (or it ended)."""
        if self.finish_reason is not None:
            raise GenerationError("the stream has already finished")
        self.completion_tokens += 1
        if token in self.stop_ids:
            return self._finish("stop", flush=True)
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.decoder is None:  # ids only: nothing to hold back
            if self.completion_tokens >= self.max_new_tokens:
                return self._finish("length", flush=False)
            chunk = self._chunk("", None)
            self.ids, self.logprobs = [], []
            return chunk
        self.pending += self.decoder.add(token)
        stops = self.config.stop
        if stops:
            hits = [(i, s) for s in stops if (i := self.pending.find(s)) >= 0]
            if hits:
                self.pending = self.pending[: min(hits)[0]]
                return self._finish("stop", flush=False)
        if self.completion_tokens >= self.max_new_tokens:
            return self._finish("length", flush=True)
        keep = _held_back(self.pending, stops) if stops else 0
        if len(self.pending) > keep:
            cut = len(self.pending) - keep
            chunk = self._chunk(self.pending[:cut], None)
            self.pending, self.ids, self.logprobs = self.pending[cut:], [], []
            return chunk
        return None

    def _chunk(self, text: str, finish: str | None) -> GenerationChunk:
        return GenerationChunk(
            text,
            self.ids,
            finish,
            self.prompt_tokens,
            self.completion_tokens,
            self.logprobs if self.config.logprobs else None,
        )

    def _finish(self, reason: str, *, flush: bool) -> GenerationChunk:
        self.finish_reason = reason
        if flush and self.decoder is not None:
            self.pending += self.decoder.flush()
        return self._chunk(self.pending, reason)


def collect(chunks: Iterable[GenerationChunk]) -> GenerationResult:
    """The whole completion from its chunks."""
    parts: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    last = GenerationChunk("")
    for chunk in chunks:
        parts.append(chunk.text)
        ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            logprobs = (logprobs or []) + chunk.logprobs
        last = chunk
    return GenerationResult(
        "".join(parts),
        ids,
        last.finish_reason or "length",
        last.prompt_tokens,
        last.completion_tokens,
        logprobs,
    )
