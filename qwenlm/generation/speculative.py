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


def _latest_match(context: Seq[int], max_ngram: int, min_ngram: int) -> tuple[int, int] | None:
    """(where the tokens after the latest earlier occurrence of the context's trailing n-gram
    start, n), longest n first; None when no n-gram of min_ngram tokens or more recurs."""
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        tail = list(context[n_ctx - n :])
        # Search backwards, excluding the tail itself, so the most recent match wins.
        for start in range(n_ctx - n - 1, -1, -1):
            if context[start] == tail[0] and list(context[start : start + n]) == tail:
                return start + n, n
    return None


def _first_guesses(n: int) -> int:
    """Guesses after a fresh match of n tokens: 2 (n - 1), one for n = 1.

    A verified row costs about a quarter of a one-token step on a CPU, so a guess must be
    right often enough to pay. On the prompts of benchmarks/speculative.py, single-token
    matches (a newline, a space) were right too seldom to pay for themselves, and two- and
    three-token matches went wrong within a few tokens more often than longer ones.
    """
    return max(1, 2 * (n - 1))


def lookup_draft(context: Seq[int], k: int, max_ngram: int = 4, min_ngram: int = 2) -> list[int]:
    """Prompt lookup: up to k tokens that followed the latest earlier occurrence of the
    context's trailing n-gram (longest n first), at most ``_first_guesses(n)`` of them; empty
    when there is none. :class:`PromptLookup` builds on this with copy runs."""
    found = _latest_match(context, max_ngram, min_ngram)
    if found is None:
        return []
    src, n = found
    return list(context[src : src + min(k, _first_guesses(n))])


class Proposer(Protocol):
    def propose(self, context: Seq[int], k: int) -> list[int]:
        """Up to ``k`` guesses of the tokens after ``context`` (may be none)."""
        ...


@dataclass
class PromptLookup:
    """Prompt lookup with copy runs, for one sequence.

    A fresh match proposes what :func:`lookup_draft` does. When every guess of a pass was
    accepted and the model's own next token also continued the copied text, the output is
    copying a stretch of the context: the next pass reads on from the same place (not from
    a new, possibly different, latest match) and proposes twice as many guesses, up to k.
    Any miss ends the run. On benchmarks/speculative.py's prompts (greedy, 0.5B, Zen 3 cost
    of a verified row) this simulated 1.38x -> 1.43x on code editing and 1.74x -> 1.84x on
    free writing against fresh matches every pass, with the same acceptance elsewhere.
    """

    max_ngram: int = 4
    min_ngram: int = 2
    _src: int | None = None  # where the copied text continues, as of the last proposal
    _end: int = 0  # the context's length at the last proposal
    _run: int = 0  # guesses of the last proposal

    def propose(self, context: Seq[int], k: int) -> list[int]:
        n_ctx = len(context)
        src, want = None, 0
        if self._src is not None and self._end < n_ctx:
            new = list(context[self._end :])  # accepted guesses and the model's own token
            if len(new) == self._run + 1 and list(context[self._src : self._src + len(new)]) == new:
                src, want = self._src + len(new), 2 * self._run
        if src is None or src >= n_ctx:
            found = _latest_match(context, self.max_ngram, self.min_ngram)
            if found is None:
                self._src = None
                return []
            src, n = found
            want = _first_guesses(n)
        out = list(context[src : src + min(k, want)])
        self._src, self._end, self._run = src, n_ctx, len(out)
        return out


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


# Default guesses a pass. A draft model pays for each guess with a step of its own, and ~1/3 of
# its guesses failed on free text, so few. Prompt lookup's guesses are free and grow with copy
# runs: 7 guesses and the last token make 8 rows, one full 8-row tile of the CPU kernels.
DRAFT_GUESSES = 5
LOOKUP_GUESSES = 7


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding settings: a draft model, or prompt lookup when ``draft`` is None."""

    draft: Engine | None = None
    num_draft: int | None = None  # the most guesses a pass; None: DRAFT_GUESSES / LOOKUP_GUESSES
    max_ngram: int = 4
    stats: SpeculationStats | None = None  # filled in, if given

    def __post_init__(self) -> None:
        if self.num_draft is not None and not 1 <= self.num_draft < SMALL_SEGMENT:
            raise GenerationError(
                f"num_draft must be between 1 and {SMALL_SEGMENT - 1}, got {self.num_draft}"
            )

    @property
    def max_guesses(self) -> int:
        """The most guesses one pass verifies."""
        if self.num_draft is not None:
            return self.num_draft
        return DRAFT_GUESSES if self.draft is not None else LOOKUP_GUESSES

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
