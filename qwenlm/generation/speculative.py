"""Speculative decoding: cheap guesses of the next few tokens, checked by the model in one pass.

Two sources of guesses: a smaller draft model sharing the tokenizer (the 0.5B for the 1.5B),
or prompt lookup, which copies what followed the last occurrence of the current n-gram in the
context (strong when the output repeats the input, as in code editing). The target model scores
the last token plus k guesses in one forward pass; guesses are kept while they equal the
target's greedy choice, and the first disagreement is replaced by the target's own token.

The output is exactly plain greedy decoding's: the prompt is prefilled the same way, and the
engine computes each verified row exactly as a one-token step would. Only greedy decoding
(temperature 0, no repetition penalty) is supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from qwenlm.errors import GenerationError
from qwenlm.generation.engine import SMALL_SEGMENT, Engine, SequenceState
from qwenlm.generation.generate import PREFILL_CHUNK, prefill


@dataclass
class SpeculationStats:
    """What speculation achieved: guesses made and kept, and target passes run."""

    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    emitted: int = 0
    history: list[int] = field(default_factory=list)  # accepted guesses per pass

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.target_passes if self.target_passes else 0.0


def lookup_draft(context: Seq[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the context's
    trailing n-gram (longest n first); empty when there is none."""
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        tail = list(context[n_ctx - n :])
        # Search backwards, excluding the tail itself, so the most recent match wins.
        for start in range(n_ctx - n - 1, -1, -1):
            if list(context[start : start + n]) == tail:
                follow = list(context[start + n : start + n + k])
                if follow:
                    return follow
    return []


class DraftModel:
    """A smaller model proposing tokens greedily, with its own cached sequence."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seq: SequenceState = engine.new_sequence()

    def propose(self, context: Seq[int], k: int) -> list[int]:
        """Catch up with ``context`` (reusing the cached prefix), then guess k tokens."""
        logits = prefill(self.engine, self.seq, context)
        out: list[int] = []
        for i in range(k):
            token = int(torch.argmax(logits))
            out.append(token)
            if i + 1 < k:
                (logits,) = self.engine.forward([(self.seq, [token])])
        return out


def speculative_step(
    target: Engine,
    prompt: Seq[int],
    *,
    draft: Engine | None = None,
    num_draft: int = 5,
    max_ngram: int = 3,
    cache: SequenceState | None = None,
    stats: SpeculationStats | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield greedy tokens for ``prompt`` without end, verifying up to ``num_draft`` guesses
    per target pass. Guesses come from ``draft`` if given, else from prompt lookup."""
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token")
    if not 1 <= num_draft < SMALL_SEGMENT:
        raise GenerationError(
            f"num_draft must be between 1 and {SMALL_SEGMENT - 1}, got {num_draft}"
        )
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise GenerationError(
            "the draft model's vocabulary differs from the target's",
            hint="use a draft from the same model family (same tokenizer)",
        )
    stats = stats if stats is not None else SpeculationStats()
    proposer = DraftModel(draft) if draft is not None else None
    seq = cache if cache is not None else target.new_sequence()
    context = list(prompt)
    token = int(torch.argmax(prefill(target, seq, prompt, prefill_chunk)))
    while True:
        stats.emitted += 1
        context.append(token)
        yield token
        # `token` is not in the target's cache yet: it leads the verification segment.
        guesses = (
            proposer.propose(context, num_draft)
            if proposer
            else lookup_draft(context, num_draft, max_ngram)
        )
        rows = target.forward([(seq, [token, *guesses])], all_logits=True)[0]
        choice = rows.argmax(-1).tolist()  # the target's greedy token after each row
        accepted = 0
        while accepted < len(guesses) and guesses[accepted] == choice[accepted]:
            accepted += 1
        seq.trim(len(guesses) - accepted)
        stats.target_passes += 1
        stats.proposed += len(guesses)
        stats.accepted += accepted
        stats.history.append(accepted)
        for g in guesses[:accepted]:
            stats.emitted += 1
            context.append(g)
            yield g
        token = choice[accepted]
