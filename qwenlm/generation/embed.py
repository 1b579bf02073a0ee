"""Embeddings: a text's vector is the mean of the model's final hidden states over its tokens.

Pooling: the mean over every prompt token of the final, normed hidden state, L2-normalised.
Decoder models used as embedders are mean-pooled or last-token-pooled; on Qwen2.5-Coder-0.5B
the mean separated paraphrases from unrelated sentences cleanly and the last token did not
(docs/serving.md#embeddings has the numbers).

The forward passes follow the engine's one numeric path, so a text's vector is the same alone or
in any batch, bit for bit: short inputs (up to ``SMALL_SEGMENT`` tokens) run together in passes
of at most that many rows, where every row is computed on its own; a longer input runs alone,
cut at the fixed prefill boundaries as a prompt is (its hidden states are the ones its prefill
computes).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from qwenlm.errors import GenerationError
from qwenlm.generation.engine import SMALL_SEGMENT, Engine, SequenceState


class Embedder:
    """Embeds ``prompts`` (token ids) one forward pass per :meth:`step`, so a server can run the
    passes between generation steps on the engine's thread; :meth:`result` once done."""

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]]) -> None:
        vocab, context = engine.config.vocab_size, engine.config.max_position_embeddings
        for i, p in enumerate(prompts):
            if not p:
                raise GenerationError(f"input {i} is empty; give at least one token")
            if len(p) > context:
                raise GenerationError(
                    f"input {i} is {len(p)} tokens, but the model's context is {context} tokens",
                    hint="split or shorten the text",
                )
            if any(not 0 <= int(t) < vocab for t in p):
                raise GenerationError(f"input {i} holds token ids outside 0..{vocab - 1}")
        if not prompts:
            raise GenerationError("nothing to embed; give at least one input")
        self.engine = engine
        self.prompts = [[int(t) for t in p] for p in prompts]
        self.sums: torch.Tensor | None = None
        # (input, its sequence, tokens still to feed); sequences are made on the engine's thread
        self.todo: collections.deque[tuple[int, SequenceState | None, list[int]]] = (
            collections.deque((i, None, p) for i, p in enumerate(self.prompts))
        )

    @property
    def done(self) -> bool:
        return not self.todo

    def step(self) -> bool:
        """One forward pass over the next pieces; returns True when every input is done."""
        engine = self.engine
        if self.sums is None:
            self.sums = torch.zeros(len(self.prompts), engine.config.hidden_size)
        batch: list[tuple[int, SequenceState, list[int], list[int]]] = []
        rows = 0
        while self.todo:
            i, seq, pending = self.todo[0]
            if seq is None:
                seq = engine.new_sequence()
                pending = engine.begin(seq, pending)
                self.todo[0] = (i, seq, pending)
            # Cut at the fixed boundaries, as a prompt's prefill is.
            end = (len(seq) // engine.prefill_chunk + 1) * engine.prefill_chunk
            piece = pending[: end - len(seq)]
            small = len(piece) <= SMALL_SEGMENT
            if batch and (not small or rows + len(piece) > SMALL_SEGMENT):
                break
            self.todo.popleft()
            batch.append((i, seq, piece, pending[len(piece) :]))
            rows += len(piece)
            if not small:
                break  # a long piece runs alone
        states = engine.forward([(s, p) for _, s, p, _ in batch], all_logits=True, hidden=True)
        for (i, seq, _, rest), h in zip(batch, states, strict=True):
            self.sums[i] += h.sum(0).cpu()  # h: (piece tokens, hidden)
            if rest:
                self.todo.append((i, seq, rest))
        return self.done

    def result(self) -> torch.Tensor:
        """(inputs, hidden) float32, each row of unit length."""
        if not self.done or self.sums is None:
            raise GenerationError("the embeddings are not finished; call step() until it is")
        lengths = torch.tensor([len(p) for p in self.prompts], dtype=torch.float32)
        return torch.nn.functional.normalize(self.sums / lengths[:, None], dim=-1)
