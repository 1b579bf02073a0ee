"""Generation as stacked generators over the one scheduler: tokens -> text stream -> result.

``generate_step`` yields token ids; ``stream_generate`` yields text chunks (stop tokens, stop
strings, the length limit applied by :class:`~qwenlm.generation.stream.TextStream`);
``generate`` collects that stream; ``batch_generate`` runs many prompts together. Each of them
drives a :class:`~qwenlm.generation.scheduler.Scheduler` on the calling thread, the same loop
the server runs on its own thread, so every surface samples, prefills, batches and speculates
through the same code and gets the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq

from torch import nn

from qwenlm.errors import GenerationError
from qwenlm.generation.config import GenerationConfig, LogitsProcessor
from qwenlm.generation.engine import PREFILL_CHUNK, Engine, SequenceState
from qwenlm.generation.scheduler import Output, Request, Scheduler, check_prompt
from qwenlm.generation.speculative import Speculation, SpeculationStats
from qwenlm.generation.stream import GenerationChunk, GenerationResult, TextStream, collect
from qwenlm.tokenizer import Tokenizer

__all__ = [
    "PREFILL_CHUNK",
    "GenerationChunk",
    "GenerationConfig",
    "GenerationResult",
    "LogitsProcessor",
    "Speculation",
    "SpeculationStats",
    "TextStream",
    "as_engine",
    "batch_generate",
    "check_prompt",
    "collect",
    "generate",
    "generate_step",
    "stream_generate",
]

# generate_step's default: greedy, no penalties (a token-level building block).
GREEDY = GenerationConfig(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


def as_engine(model: nn.Module | Engine) -> Engine:
    return model if isinstance(model, Engine) else Engine(model)


def _drive(scheduler: Scheduler, request: Request, outputs: list[Output]) -> Iterator[Output]:
    """Step ``scheduler`` while the consumer asks for more; cancel the request if it stops."""
    scheduler.submit(request)
    try:
        while not request.finished or outputs:
            if not outputs:
                scheduler.step()
                continue
            out = outputs.pop(0)
            if out.error is not None:
                raise GenerationError(f"generation failed: {out.error}")
            yield out
    finally:
        if not request.finished:
            request.cancel()
            scheduler.step()  # lets it go (no forward pass: it was the only request)


def generate_step(
    model: nn.Module | Engine,
    prompt: Seq[int],
    config: GenerationConfig | None = None,
    *,
    sequence: SequenceState | None = None,
    speculation: Speculation | None = None,
) -> Iterator[int]:
    """Yield sampled token ids until the context is full (no stop rules; greedy by default).

    ``sequence`` continues a caller-held :class:`SequenceState`: whatever prefix of ``prompt``
    it holds is reused. A token is fed to the model only when the caller asks for the next
    one, so stopping costs no wasted forward pass.
    """
    engine = as_engine(model)
    config = (config or GREEDY).replace(
        ignore_eos=True, stop=(), max_new_tokens=engine.config.max_position_embeddings
    )
    outputs: list[Output] = []
    request = Request(prompt, config, outputs.append, sequence=sequence, speculation=speculation)
    scheduler = Scheduler(engine, None, max_num_seqs=1, prefix_cache_tokens=0)
    for out in _drive(scheduler, request, outputs):
        yield from out.token_ids


def _chunk(out: Output) -> GenerationChunk:
    return GenerationChunk(
        out.text,
        out.token_ids,
        out.finish_reason,
        out.prompt_tokens,
        out.completion_tokens,
        out.logprobs,
    )


def stream_generate(
    model: nn.Module | Engine,
    tokenizer: Tokenizer,
    prompt: Seq[int],
    config: GenerationConfig | None = None,
    *,
    sequence: SequenceState | None = None,
    speculation: Speculation | None = None,
) -> Iterator[GenerationChunk]:
    """Text deltas for ``prompt``; the last chunk carries ``finish_reason`` and token counts.

    With ``speculation`` guesses are verified in batches, which gives the same text faster when
    they are often right.
    """
    engine = as_engine(model)
    outputs: list[Output] = []
    request = Request(
        prompt,
        config or GenerationConfig(),
        outputs.append,
        sequence=sequence,
        speculation=speculation,
    )
    scheduler = Scheduler(engine, tokenizer, max_num_seqs=1, prefix_cache_tokens=0)
    for out in _drive(scheduler, request, outputs):
        yield _chunk(out)


def generate(
    model: nn.Module | Engine,
    tokenizer: Tokenizer,
    prompt: Seq[int],
    config: GenerationConfig | None = None,
    *,
    sequence: SequenceState | None = None,
    speculation: Speculation | None = None,
) -> GenerationResult:
    """The whole completion at once: the collected :func:`stream_generate`."""
    return collect(
        stream_generate(
            model, tokenizer, prompt, config, sequence=sequence, speculation=speculation
        )
    )


def batch_generate(
    model: nn.Module | Engine,
    tokenizer: Tokenizer,
    prompts: Seq[Seq[int]],
    config: GenerationConfig | Seq[GenerationConfig] | None = None,
    *,
    max_num_seqs: int = 16,
    prefix_cache_tokens: int = 16384,
    speculation: Speculation | None = None,
) -> list[GenerationResult]:
    """Complete every prompt, decoding together; ``config`` is shared or one per prompt.

    Results keep prompt order and equal what :func:`generate` gives for each prompt alone.
    Prompts that share a long prefix (few-shot examples) prefill it once.
    """
    engine = as_engine(model)
    configs = (
        list(config)
        if isinstance(config, (list, tuple))
        else [config or GenerationConfig()] * len(prompts)
    )
    if len(configs) != len(prompts):
        raise GenerationError(f"{len(prompts)} prompts but {len(configs)} configs")
    outputs: list[list[Output]] = [[] for _ in prompts]
    requests = [
        Request(p, c, outs.append, speculation=speculation)
        for p, c, outs in zip(prompts, configs, outputs, strict=True)
    ]
    scheduler = Scheduler(
        engine,
        tokenizer,
        max_num_seqs=max_num_seqs,
        max_queue=len(requests),
        prefix_cache_tokens=prefix_cache_tokens,
    )
    scheduler.run(requests)
    for outs in outputs:
        for out in outs:
            if out.error is not None:
                raise GenerationError(f"generation failed: {out.error}")
    return [collect(_chunk(o) for o in outs) for outs in outputs]
