"""Speculative decoding: cheap guesses of the next few tokens, checked by the model in one pass.

Two sources of guesses (proposers): a smaller draft model sharing the tokenizer (the 0.5B for
the 1.5B), or prompt lookup, which copies what followed the latest earlier occurrence of the
current n-gram in the context (strong when the output repeats the input, as in code editing),
and proposes nothing when no n-gram matches. The scheduler feeds the last token plus the
guesses as one segment, samples each row with the sequence's own sampler and keeps guesses
while they equal what it sampled.

The output is exactly that of decoding without speculation, for greedy decoding and for
seeded sampling alike: every verified row is computed as a one-token step would compute it
(the engine's row-exact path), and the sampler draws once per emitted token, in order.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from qwenlm.errors import GenerationError
from qwenlm.generation.engine import SMALL_SEGMENT, Engine, SequenceState
from qwenlm.generation.sampling import greedy_token


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


def lookup_draft(context: Seq[int], k: int, max_ngram: int = 4, min_ngram: int = 2) -> list[int]:
    """Prompt lookup: up to k tokens that followed the latest earlier occurrence of the
    context's trailing n-gram (longest n first); empty when there is none.

    A match of n tokens proposes at most 2 (n - 1) of them (one for n = 1): a verified row
    costs about a fifth of a one-token step on a CPU, so a guess must be right often enough
    to pay. On the code-editing and free-writing prompts of benchmarks/speculative.py,
    single-token matches (a newline, a space) were right too seldom to pay for themselves,
    and two- and three-token matches went wrong within a few tokens more often than longer
    ones.
    """
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        tail = list(context[n_ctx - n :])
        # Search backwards, excluding the tail itself, so the most recent match wins.
        for start in range(n_ctx - n - 1, -1, -1):
            if context[start] == tail[0] and list(context[start : start + n]) == tail:
                follow = list(context[start + n : start + n + min(k, max(1, 2 * (n - 1)))])
                if follow:
                    return follow
    return []


class Proposer(Protocol):
    def propose(self, context: Seq[int], k: int) -> list[int]:
        """Up to ``k`` guesses of the tokens after ``context`` (may be none)."""
        ...


@dataclass
class PromptLookup:
    max_ngram: int = 4
    min_ngram: int = 2

    def propose(self, context: Seq[int], k: int) -> list[int]:
        return lookup_draft(context, k, self.max_ngram, self.min_ngram)


class DraftModel:
    """A smaller model proposing tokens greedily, with its own cached sequence."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seq: SequenceState = engine.new_sequence()

    def propose(self, context: Seq[int], k: int) -> list[int]:
        """Catch up with ``context`` (reusing the cached prefix), then guess k tokens."""
        logits = self.engine.prefill(self.seq, context, exact=False)
        out: list[int] = []
        for i in range(k):
            token = greedy_token(logits)
            out.append(token)
            if i + 1 < k:
                (logits,) = self.engine.forward([(self.seq, [token])])
        return out


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding settings: a draft model, or prompt lookup when ``draft`` is None."""

    draft: Engine | None = None
    num_draft: int = 5
    max_ngram: int = 4
    stats: SpeculationStats | None = None  # filled in, if given

    def __post_init__(self) -> None:
        if not 1 <= self.num_draft < SMALL_SEGMENT:
            raise GenerationError(
                f"num_draft must be between 1 and {SMALL_SEGMENT - 1}, got {self.num_draft}"
            )

    def check(self, target: Engine) -> None:
        if self.draft is not None and self.draft.config.vocab_size != target.config.vocab_size:
            raise GenerationError(
                "the draft model's vocabulary differs from the target's",
                hint="use a draft from the same model family (same tokenizer)",
            )

    def proposer(self) -> Proposer:
        """A fresh proposer for one sequence."""
        if self.draft is not None:
            return DraftModel(self.draft)
        return PromptLookup(self.max_ngram)
