"""Generation as stacked generators: token step -> text stream -> collected result.

``generate_step`` knows token ids only. ``stream_generate`` turns them into text deltas,
applies stop tokens, stop strings and the length limit, and reports the finish reason.
``generate`` collects the stream; there is no second code path.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qwenlm.errors import GenerationError
from qwenlm.generation.cache import PromptCache
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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate_step(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    cache: PromptCache | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield sampled token ids without end: prefill ``prompt``, then decode one token at a time.

    With a ``cache`` that already holds a prefix of ``prompt`` only the rest is prefilled. A
    token is fed to the model only when the caller asks for the next one, so stopping costs
    no wasted forward pass.
    """
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token")
    cache = cache if cache is not None else PromptCache(model)
    device = model_device(model)
    vocab = model.config.vocab_size
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    if repetition_penalty != 1.0:
        seen[torch.tensor(list(prompt), device=device)] = True

    def forward(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            out = model(torch.tensor([ids], device=device), cache.cache, last_only=True)
        cache.tokens.extend(ids)
        return out[0, -1].float()

    pending = list(prompt[cache.reuse(list(prompt)) :])
    while len(pending) > prefill_chunk:
        forward(pending[:prefill_chunk])
        pending = pending[prefill_chunk:]
    while True:
        logits = forward(pending)
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        seen[token] = True
        yield token
        pending = [token]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    config: GenerationConfig | None = None,
    *,
    cache: PromptCache | None = None,
) -> Iterator[GenerationChunk]:
    """Text deltas for ``prompt``; the last chunk carries ``finish_reason`` and token counts.

    Stop strings are never emitted, not even in part: text that could be the start of one is
    held back until it either completes the stop string (generation ends) or cannot.
    """
    config = config or GenerationConfig()
    context = model.config.max_position_embeddings
    if len(prompt) >= context:
        raise GenerationError(
            f"the prompt is {len(prompt)} tokens, but the model's context is {context} tokens",
            hint="shorten the prompt or the conversation history",
        )
    if any(not 0 <= int(t) < model.config.vocab_size for t in prompt):
        raise GenerationError(
            f"the prompt holds token ids outside 0..{model.config.vocab_size - 1}"
        )
    max_new = min(config.max_new_tokens, context - len(prompt))
    stop_ids = (
        set()
        if config.ignore_eos
        else set(
            config.stop_token_ids if config.stop_token_ids is not None else tokenizer.stop_token_ids
        )
    )
    seed = config.seed if config.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    steps = generate_step(
        model,
        prompt,
        cache=cache,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        repetition_penalty=config.repetition_penalty,
        generator=generator,
    )
    decoder = tokenizer.stream_decoder()
    pending = ""  # decoded text not yet emitted (may hold the start of a stop string)
    ids: list[int] = []  # tokens behind `pending`
    n = 0
    finish, stopped_by_string = "length", False
    for token in steps:
        n += 1
        if token in stop_ids:
            finish = "stop"
            break
        ids.append(token)
        pending += decoder.add(token)
        if config.stop:
            hits = [(i, s) for s in config.stop if (i := pending.find(s)) >= 0]
            if hits:
                pending = pending[: min(hits)[0]]
                finish, stopped_by_string = "stop", True
                break
            keep = _held_back(pending, config.stop)
        else:
            keep = 0
        if len(pending) > keep:
            cut = len(pending) - keep
            yield GenerationChunk(
                pending[:cut], ids, prompt_tokens=len(prompt), completion_tokens=n
            )
            pending, ids = pending[cut:], []
        if n >= max_new:
            break
    steps.close()
    if not stopped_by_string:
        pending += decoder.flush()
    yield GenerationChunk(pending, ids, finish, prompt_tokens=len(prompt), completion_tokens=n)


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    config: GenerationConfig | None = None,
    *,
    cache: PromptCache | None = None,
) -> GenerationResult:
    """The whole completion at once: the collected :func:`stream_generate`."""
    parts: list[str] = []
    ids: list[int] = []
    last = GenerationChunk("")
    for chunk in stream_generate(model, tokenizer, prompt, config, cache=cache):
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
