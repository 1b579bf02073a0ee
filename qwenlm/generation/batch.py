"""Batched generation: several prompts of different lengths decoded together.

Each prompt gets its own sequence and is prefilled on its own (so it starts exactly as it would
alone); then every decode step feeds one token of each unfinished sequence through the model
in one ragged batch, reading the weights once for all of them. Sequences leave the batch as
they finish. With greedy decoding each result equals what ``generate`` gives for that prompt.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from qwenlm.generation.engine import SMALL_SEGMENT, Engine
from qwenlm.generation.generate import (
    GenerationConfig,
    GenerationResult,
    TextStream,
    as_engine,
    check_prompt,
    collect,
    make_generator,
    prefill,
)
from qwenlm.generation.sampling import apply_repetition_penalty, sample
from qwenlm.tokenizer import Tokenizer


class _Row:
    """One prompt's state in the batch: its sequence, sampler and text stream."""

    def __init__(
        self, engine: Engine, tokenizer: Tokenizer, prompt: Seq[int], config: GenerationConfig
    ) -> None:
        self.config = config
        self.seq = engine.new_sequence()
        self.stream = TextStream(
            tokenizer, config, len(prompt), check_prompt(engine, prompt, config.max_new_tokens)
        )
        self.generator = make_generator(config, engine.device)
        self.seen = torch.zeros(engine.config.vocab_size, dtype=torch.bool, device=engine.device)
        if config.repetition_penalty != 1.0:
            self.seen[torch.tensor(list(prompt), device=engine.device)] = True
        self.chunks = []
        self.token: int | None = None

    def take(self, logits: torch.Tensor) -> None:
        c = self.config
        logits = apply_repetition_penalty(logits, self.seen, c.repetition_penalty)
        self.token = sample(
            logits,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            generator=self.generator,
        )
        self.seen[self.token] = True
        chunk = self.stream.push(self.token)
        if chunk is not None:
            self.chunks.append(chunk)

    @property
    def done(self) -> bool:
        return self.stream.finish_reason is not None


def batch_generate(
    model: torch.nn.Module | Engine,
    tokenizer: Tokenizer,
    prompts: Seq[Seq[int]],
    config: GenerationConfig | Seq[GenerationConfig] | None = None,
) -> list[GenerationResult]:
    """Complete every prompt; ``config`` is shared or one per prompt. Results keep prompt order."""
    engine = as_engine(model)
    configs = (
        list(config)
        if isinstance(config, (list, tuple))
        else [config or GenerationConfig()] * len(prompts)
    )
    if len(configs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(configs)} configs")
    rows = [_Row(engine, tokenizer, p, c) for p, c in zip(prompts, configs, strict=True)]
    for row, prompt in zip(rows, prompts, strict=True):
        row.take(prefill(engine, row.seq, prompt))
    while active := [r for r in rows if not r.done]:
        # Decode-sized groups keep every row on the exact one-token path.
        for i in range(0, len(active), SMALL_SEGMENT):
            group = active[i : i + SMALL_SEGMENT]
            logits = engine.forward([(r.seq, [r.token]) for r in group])
            for r, lg in zip(group, logits, strict=True):
                r.take(lg)
    return [collect(iter(r.chunks)) for r in rows]
