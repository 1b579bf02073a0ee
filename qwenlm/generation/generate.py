"""Generation as stacked generators: token step -> text stream -> collected result.

``generate_step`` knows token ids only. ``TextStream`` turns one sequence's tokens into text
deltas, applying stop tokens, stop strings and the length limit; ``stream_generate`` stacks the
two, and ``generate`` collects the stream: there is no second code path. Batched and
speculative generation (``batch.py``, ``speculative.py``) feed the same TextStream.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import nn

from qwenlm.errors import GenerationError
from qwenlm.generation.engine import Engine, SequenceState
from qwenlm.generation.sampling import apply_repetition_penalty, sample
from qwenlm.tokenizer import Tokenizer

# Prompts longer than this are prefilled in pieces, bounding activation and mask memory.
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``temperature=0`` is greedy decoding.

    Defaults are the sampling settings Qwen2.5's instruct models ship with.
    """

    max_new_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.05
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's end-of-turn ids
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> GenerationError:
            return GenerationError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be a positive integer")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 turns it off)")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0 (1.0 turns it off)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")


@dataclass
class GenerationChunk:
    """One step of a text stream: new text, the tokens behind it, and at the end why it ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def as_engine(model: nn.Module | Engine) -> Engine:
    return model if isinstance(model, Engine) else Engine(model)


def prefill(
    engine: Engine, seq: SequenceState, prompt: Seq[int], chunk: int = PREFILL_CHUNK
) -> torch.Tensor:
    """Feed ``prompt`` (minus what ``seq`` already holds) in chunks; logits after its last token.

    Every way of generating prefills through here, so they all start from the same numbers.
    """
    pending = list(prompt[seq.reuse(prompt) :])
    while len(pending) > chunk:
        engine.forward([(seq, pending[:chunk])])
        pending = pending[chunk:]
    (logits,) = engine.forward([(seq, pending)])
    return logits


def generate_step(
    model: nn.Module | Engine,
    prompt: Seq[int],
    *,
    cache: SequenceState | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield sampled token ids without end: prefill ``prompt``, then decode one token at a time.

    ``cache`` is a :class:`SequenceState` of the engine; whatever prefix of ``prompt`` it already
    holds is reused and only the rest is prefilled. A token is fed to the model only when the
    caller asks for the next one, so stopping costs no wasted forward pass.
    """
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token")
    engine = as_engine(model)
    seq = cache if cache is not None else engine.new_sequence()
    seen = torch.zeros(engine.config.vocab_size, dtype=torch.bool, device=engine.device)
    if repetition_penalty != 1.0:
        seen[torch.tensor(list(prompt), device=engine.device)] = True
    logits = prefill(engine, seq, prompt, prefill_chunk)
    while True:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        seen[token] = True
        yield token
        (logits,) = engine.forward([(seq, [token])])


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
    held back until it either completes the stop string (generation ends) or cannot.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: GenerationConfig,
        prompt_tokens: int,
        max_new_tokens: int,
    ) -> None:
        self.config = config
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.stop_ids = (
            set()
            if config.ignore_eos
            else set(
                config.stop_token_ids
                if config.stop_token_ids is not None
                else tokenizer.stop_token_ids
            )
        )
        self.decoder = tokenizer.stream_decoder()
        self.pending = ""  # decoded text not yet emitted (may hold the start of a stop string)
        self.ids: list[int] = []  # tokens behind `pending`
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def push(self, token: int) -> GenerationChunk | None:
        """Take one sampled token; returns a chunk when there is text to release (or it ended)."""
        if self.finish_reason is not None:
            raise GenerationError("the stream has already finished")
        self.completion_tokens += 1
        if token in self.stop_ids:
            return self._finish("stop", flush=True)
        self.ids.append(token)
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
            self.pending, self.ids = self.pending[cut:], []
            return chunk
        return None

    def _chunk(self, text: str, finish: str | None) -> GenerationChunk:
        return GenerationChunk(text, self.ids, finish, self.prompt_tokens, self.completion_tokens)

    def _finish(self, reason: str, *, flush: bool) -> GenerationChunk:
        self.finish_reason = reason
        if flush:
            self.pending += self.decoder.flush()
        return self._chunk(self.pending, reason)


def check_prompt(config: nn.Module | Engine | object, prompt: Seq[int], max_new_tokens: int) -> int:
    """Validate prompt ids against the model; returns how many tokens may still be generated."""
    cfg = config.config if hasattr(config, "config") else config
    context = cfg.max_position_embeddings
    if len(prompt) >= context:
        raise GenerationError(
            f"the prompt is {len(prompt)} tokens, but the model's context is {context} tokens",
            hint="shorten the prompt or the conversation history",
        )
    if any(not 0 <= int(t) < cfg.vocab_size for t in prompt):
        raise GenerationError(f"the prompt holds token ids outside 0..{cfg.vocab_size - 1}")
    return min(max_new_tokens, context - len(prompt))


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator:
    seed = config.seed if config.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding settings: a draft model, or prompt lookup when ``draft`` is None."""

    draft: Engine | None = None
    num_draft: int = 5
    max_ngram: int = 3
    stats: object | None = None  # a SpeculationStats to fill in, if given


def stream_generate(
    model: nn.Module | Engine,
    tokenizer: Tokenizer,
    prompt: Seq[int],
    config: GenerationConfig | None = None,
    *,
    cache: SequenceState | None = None,
    speculation: Speculation | None = None,
) -> Iterator[GenerationChunk]:
    """Text deltas for ``prompt``; the last chunk carries ``finish_reason`` and token counts.

    With ``speculation`` the tokens come from speculative decoding, which gives the same
    greedy text faster when its guesses are often right.
    """
    config = config or GenerationConfig()
    engine = as_engine(model)
    stream = TextStream(
        tokenizer, config, len(prompt), check_prompt(engine, prompt, config.max_new_tokens)
    )
    if speculation is not None:
        from qwenlm.generation.speculative import speculative_step

        if config.temperature != 0 or config.repetition_penalty != 1.0:
            raise GenerationError(
                "speculative decoding is greedy only",
                hint="set temperature 0 and repetition_penalty 1.0, or turn speculation off",
            )
        steps = speculative_step(
            engine,
            prompt,
            draft=speculation.draft,
            num_draft=speculation.num_draft,
            max_ngram=speculation.max_ngram,
            cache=cache,
            stats=speculation.stats,
        )
    else:
        steps = generate_step(
            engine,
            prompt,
            cache=cache,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            repetition_penalty=config.repetition_penalty,
            generator=make_generator(config, engine.device),
        )
    try:
        for token in steps:
            chunk = stream.push(token)
            if chunk is not None:
                yield chunk
            if stream.finish_reason is not None:
                return
    finally:
        steps.close()


def generate(
    model: nn.Module | Engine,
    tokenizer: Tokenizer,
    prompt: Seq[int],
    config: GenerationConfig | None = None,
    *,
    cache: SequenceState | None = None,
) -> GenerationResult:
    """The whole completion at once: the collected :func:`stream_generate`."""
    return collect(stream_generate(model, tokenizer, prompt, config, cache=cache))


def collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    parts: list[str] = []
    ids: list[int] = []
    last = GenerationChunk("")
    for chunk in chunks:
        parts.append(chunk.text)
        ids.extend(chunk.token_ids)
        last = chunk
    return GenerationResult(
        "".join(parts),
        ids,
        last.finish_reason or "length",
        last.prompt_tokens,
        last.completion_tokens,
    )
