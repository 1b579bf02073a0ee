"""Choosing the next token: the one sampler every surface uses.

:func:`sample` is the pure step (filters, then a draw). :class:`Sampler` is one sequence's
sampling state, built from a :class:`~qwenlm.generation.config.GenerationConfig`: its random
generator, the tokens seen so far for the penalties, the logits processors, and the
log-probabilities asked for. The CLI, the Python API, the server, the evaluator and
speculative decoding all sample through it, so equal settings give equal tokens everywhere.
"""

from __future__ import annotations

import secrets
from collections.abc import Container, Sequence
from dataclasses import dataclass

import torch

from qwenlm.generation.config import GenerationConfig


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the ``top`` alternatives (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty: tokens already in the sequence become less likely.

    ``seen`` is a boolean mask over the vocabulary, or (for one row of logits) the seen ids
    themselves, each once. Positive logits are divided by the penalty and negative ones
    multiplied, so the penalty always lowers the probability.
    """
    if penalty == 1.0:
        return logits
    # Only the seen tokens change: touching those alone, not three passes over the whole
    # vocabulary, took this from ~0.9 ms to ~0.1 ms of a 20 ms decode step (152k entries);
    # given the ids, not a mask to search (nonzero: ~0.5 ms), it is a few microseconds.
    if logits.dim() != 1:
        return torch.where(seen, _penalized(logits, penalty), logits)
    idx = seen if seen.dtype != torch.bool else seen.nonzero().squeeze(1)
    vals = logits.index_select(0, idx)
    return logits.index_copy(0, idx, _penalized(vals, penalty))


def _penalized(x: torch.Tensor, penalty: float) -> torch.Tensor:
    """Positive logits divided by the penalty, the others multiplied (one formula for every
    path, so they round alike)."""
    return torch.where(x > 0, x / penalty, x * penalty)


# The greedy tokens the native output head found for the rows of the last step it ran:
# (its logits, their version then, {a row's address: its token}). Kept for one step only
# (the next replaces it); holding the logits keeps their memory from being reused.
_KNOWN: list[tuple[torch.Tensor, int, dict[int, int]]] = []


def remember_greedy(logits: torch.Tensor, tokens: list[int]) -> None:
    """Note that ``tokens[r]`` is :func:`greedy_token` of row r of ``logits`` ((rows,
    vocab), or (vocab,) for one), as the native output head found it while writing them
    (-1: not found); valid for any float32 view of a whole row until the logits change in
    place (their version counter moves). Replaces what the last call noted."""
    base, step = logits.data_ptr(), logits.stride(0) * 4 if logits.dim() == 2 else 0
    rows = {base + r * step: t for r, t in enumerate(tokens) if t >= 0}
    _KNOWN[:] = [(logits, logits._version, rows)] if rows else []


def _known_greedy(logits: torch.Tensor) -> int | None:
    """The greedy token the native head noted for ``logits`` (:func:`remember_greedy`), or None."""
    for noted, version, rows in _KNOWN:
        token = rows.get(logits.data_ptr())
        if (
            token is not None
            and logits._version == version  # (a view shares its base's version counter)
            and logits.dtype == torch.float32
            and logits.dim() == 1
            and logits.shape[0] == noted.shape[-1]
            and logits.stride(0) == 1
        ):
            return token
    return None


def greedy_penalized(
    logits: torch.Tensor,
    seen: torch.Tensor,
    penalty: float,
    *,
    seen_set: Container[int] | None = None,
) -> int:
    """``greedy_token(apply_repetition_penalty(logits, seen, penalty))`` for one row, without
    a penalized copy of the vocabulary. ``seen``: the seen ids, each once (and ``seen_set``
    the same ids, for a cheaper membership test).

    A penalty of 1 or more only lowers seen tokens, so when the native head's greedy token
    (:func:`remember_greedy`) is unseen it is the answer: a lowered token can neither
    overtake it nor tie it from an earlier index (it would have been the first maximum
    already). Otherwise the seen entries are penalized in place through a numpy view (which
    leaves torch's version counter, and so the other rows' noted tokens, alone), the argmax
    taken and the entries restored: the same values at the same places as the copy, so the
    same token. The copy of 152k logits and the pass over it were ~0.3-0.5 ms a row of a
    batched server step.
    """
    if penalty >= 1.0:
        token = _known_greedy(logits)
        if token is not None:
            unseen = token not in seen_set if seen_set is not None else not (seen == token).any()
            if unseen:
                return token
    if (
        logits.device.type != "cpu"
        or logits.dtype != torch.float32
        or logits.dim() != 1
        or logits.stride(0) != 1
    ):
        return greedy_token(apply_repetition_penalty(logits, seen, penalty))
    vals = logits.index_select(0, seen)
    a, ids = logits.detach().numpy(), seen.numpy()
    a[ids] = _penalized(vals, penalty).numpy()
    try:
        return int(a.argmax())
    finally:
        a[ids] = vals.numpy()


def greedy_token(logits: torch.Tensor) -> int:
    """The id of the largest logit (the first of equal ones; a NaN counts as largest).

    On the CPU numpy's argmax: torch's took ~0.37 ms over a 152k vocabulary, about 2% of a
    decode step, against ~0.015 ms (its max alone is fast; the index-tracking reduction is not).
    After a native decode step the head has found it already (:func:`remember_greedy`): the
    logits, written while the head's weights streamed through the caches, are back in memory
    by then, and reading them again cost ~0.15 ms.
    """
    token = _known_greedy(logits)
    if token is not None:
        return token
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
        return int(logits.detach().contiguous().numpy().argmax())
    return int(torch.argmax(logits))


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from ``logits`` (vocab,).

    temperature 0 is greedy. top_k 0, top_p 1.0 and min_p 0 switch those filters off. The
    filters apply in the order the reference implementations use: temperature, top-k, top-p,
    min-p (tokens below ``min_p`` times the top token's probability are dropped).
    """
    if temperature <= 0:
        return greedy_token(logits)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose total mass is at most 1 - top_p; the top token always stays.
        drop = cum <= 1 - top_p
        drop[-1] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A random generator seeded with ``seed`` (any integer), or a fresh random seed."""
    seed = secrets.randbits(63) if seed is None else seed % 2**64
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """One sequence's sampling: processors, penalties, filters, the draw and its logprobs.

    ``seed_offset`` gives the ``n`` choices of one seeded request different draws.
    """

    def __init__(
        self,
        config: GenerationConfig,
        prompt: Sequence[int],
        vocab_size: int,
        device: torch.device,
        *,
        seed_offset: int = 0,
    ) -> None:
        self.config = config
        seed = None if config.seed is None else config.seed + seed_offset
        self.generator = make_generator(seed, device)
        self.generated: list[int] = []
        self.seen: dict[int, None] | None = None  # the ids seen so far, each once, in order
        self._seen_ids: torch.Tensor | None = None  # the same as a tensor, rebuilt when it grows
        self.device = device
        if config.repetition_penalty != 1.0:
            self.seen = dict.fromkeys(t for t in prompt if 0 <= t < vocab_size)
        self.counts: torch.Tensor | None = None
        if config.presence_penalty or config.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if config.logit_bias:
            ids = [t for t in config.logit_bias if t < vocab_size]
            self.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor([config.logit_bias[t] for t in ids], device=device),
            )

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` after the processors, the bias and the penalties (before the filters)."""
        c = self.config
        x = logits
        for processor in c.logits_processors:
            x = processor(self.generated, x)
        if self.bias is not None:
            x = x.clone()
            x[self.bias[0]] += self.bias[1]
        if self.seen is not None:
            x = apply_repetition_penalty(x, self._seen_tensor(), c.repetition_penalty)
        if self.counts is not None:
            x = x - self.counts * c.frequency_penalty - (self.counts > 0) * c.presence_penalty
        return x

    def __call__(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """Choose the next token from ``logits`` (vocab,) and remember it."""
        c = self.config
        if (
            c.temperature <= 0
            and self.seen is not None
            and self.counts is None
            and self.bias is None
            and not c.logits_processors
        ):
            token = greedy_penalized(
                logits, self._seen_tensor(), c.repetition_penalty, seen_set=self.seen
            )
        else:
            token = self._draw(logits)
        lp = self.logprob(logits, token) if c.logprobs else None
        self.generated.append(token)
        if self.seen is not None:
            self.seen[token] = None
        if self.counts is not None:
            self.counts[token] += 1
        return token, lp

    def _seen_tensor(self) -> torch.Tensor:
        if self._seen_ids is None or len(self._seen_ids) != len(self.seen):
            self._seen_ids = torch.tensor(list(self.seen), dtype=torch.long, device=self.device)
        return self._seen_ids

    def _draw(self, logits: torch.Tensor) -> int:
        c = self.config
        return sample(
            self.adjusted(logits),
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            min_p=c.min_p,
            generator=self.generator,
        )

    def logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        """The log-probability of ``token`` under the model's own distribution (no sampling
        settings), with the ``top_logprobs`` most likely alternatives."""
        return token_logprobs(logits[None], [token], self.config.top_logprobs)[0]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Each row's log-probability of its token in ``tokens`` under the model's distribution
    (``logits`` (T, vocab)), with the ``top`` most likely alternatives; rows are taken a few at a
    time, so scoring a long prompt never holds a second (T, vocab) table."""
    out: list[TokenLogprob] = []
    for start in range(0, len(tokens), 64):
        lp = torch.log_softmax(logits[start : start + 64].float(), -1)
        ids = torch.tensor(tokens[start : start + 64], device=lp.device)
        chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if top:
            values, idx = torch.topk(lp, top)
            tops = [
                list(zip(i, v, strict=True))
                for i, v in zip(idx.tolist(), values.tolist(), strict=True)
            ]
        out.extend(
            TokenLogprob(int(t), c, k)
            for t, c, k in zip(tokens[start : start + 64], chosen, tops, strict=True)
        )
    return out
