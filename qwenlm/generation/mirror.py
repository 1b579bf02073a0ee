"""Tensor-parallel engine steps: rank 0 leads, every other rank mirrors its forward passes.

Under tensor parallelism (:func:`qwenlm.parallel.tensor_parallel`) a forward pass is a
collective operation: all ranks run it together, on the same segments. Rank 0 runs everything
else alone (the scheduler, the server, the evaluator, the CLI) through a :class:`LeaderEngine`,
which sends each forward pass's segments before running it: whether it returns hidden states
instead of logits, and for each segment the sequence's id, the position it starts at, its
tokens, whether every row's logits are wanted and dynamic NTK's factor. A
:class:`FollowerEngine` on every other rank runs the same pass on caches of
its own, which hold the same sequences for its heads. What happens to sequences between passes
travels with the next one: forks (a copy of a prefix) and sequences rank 0 let go of. Trims
need no message: a segment starting at position p drops whatever the follower held past p.

A forward pass that fails on one rank after the others entered it cannot be recovered (the
collectives wait for it); the process group fails, and torchrun stops every rank.
"""

from __future__ import annotations

import collections
import contextlib
import struct
import weakref
from collections.abc import Sequence as Seq

import torch
from torch import nn

from qwenlm.errors import GenerationError
from qwenlm.generation.cache import SequenceState
from qwenlm.generation.engine import Engine
from qwenlm.parallel import DistributedError, StepChannel

STOP, STEP = 0, 1  # message kinds
FORK, FREE = 1, 2  # operations on sequences, applied before a step's forward pass


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", n))[0]


class LeaderEngine(Engine):
    """Rank 0's engine: an :class:`Engine` that sends every forward pass to the followers."""

    def __init__(self, model: nn.Module, channel: StepChannel, *, kv_cache: str = "float") -> None:
        # No CUDA graphs: a recorded step would hide the collectives from the followers' order.
        super().__init__(model, kv_cache=kv_cache, cuda_graphs=False)
        self.channel = channel
        self.closed = False
        self._ids: weakref.WeakKeyDictionary[SequenceState, int] = weakref.WeakKeyDictionary()
        self._next_id = 0
        # Filled from any thread (a finalizer runs where the last reference goes), drained by
        # the thread that runs forward passes; deque appends and pops are atomic.
        self._ops: collections.deque[tuple[int, int, int, int]] = collections.deque()

    def new_sequence(self) -> SequenceState:
        seq = super().new_sequence()
        sid = self._next_id
        self._next_id += 1
        self._ids[seq] = sid
        weakref.finalize(seq, self._ops.append, (FREE, sid, 0, 0))
        return seq

    def fork(self, seq: SequenceState) -> SequenceState:
        new = super().fork(seq)
        self._ops.append((FORK, self._id(seq), self._id(new), len(seq)))
        return new

    def _id(self, seq: SequenceState) -> int:
        try:
            return self._ids[seq]
        except KeyError:
            raise GenerationError(
                "a sequence from another engine was fed to a tensor-parallel engine",
                hint="create sequences with this model's new_sequence()",
            ) from None

    def forward(
        self,
        segments: Seq[tuple[SequenceState, Seq[int]]],
        *,
        all_logits: bool | Seq[bool] = False,
        hidden: bool = False,
    ) -> list[torch.Tensor]:
        every = [all_logits] * len(segments) if isinstance(all_logits, bool) else all_logits
        if self.closed:
            raise GenerationError("the tensor-parallel engine is closed")
        if any(not tokens for _, tokens in segments):
            raise ValueError("a segment needs at least one token")
        msg = [STEP, int(hidden)]
        ops = [self._ops.popleft() for _ in range(len(self._ops))]
        msg.append(len(ops))
        for op in ops:
            msg.extend(op)
        msg.append(len(segments))
        for (seq, tokens), full in zip(segments, every, strict=True):
            alpha = seq.ntk_alpha
            flags = int(bool(full)) | (2 if alpha is not None else 0)
            msg += [self._id(seq), len(seq), len(tokens), flags, _float_bits(alpha or 0.0)]
            msg.extend(int(t) for t in tokens)
        self.channel.send(msg)
        return super().forward(segments, all_logits=every, hidden=hidden)

    def close(self) -> None:
        """Let the followers go (their :meth:`FollowerEngine.follow` returns)."""
        if not self.closed:
            self.closed = True
            # they may be gone already (e.g. all were interrupted together)
            with contextlib.suppress(RuntimeError):
                self.channel.send([STOP])


class FollowerEngine(Engine):
    """The engine of ranks other than 0: runs the forward passes rank 0 sends."""

    def __init__(self, model: nn.Module, channel: StepChannel, *, kv_cache: str = "float") -> None:
        super().__init__(model, kv_cache=kv_cache, cuda_graphs=False)
        self.channel = channel

    def follow(self) -> None:
        """Run rank 0's forward passes until it closes its engine."""
        seqs: dict[int, SequenceState] = {}
        while True:
            msg = iter(self.channel.receive())
            if next(msg) == STOP:
                return
            hidden = bool(next(msg))
            for _ in range(next(msg)):
                op, a, b, n = next(msg), next(msg), next(msg), next(msg)
                if op == FREE:
                    seqs.pop(a, None)
                elif op == FORK:
                    src = seqs.get(a)
                    seqs[b] = self.fork(src) if src is not None else self.new_sequence()
                    seqs[b].trim(len(seqs[b]) - n)
            segments, every = [], []
            for _ in range(next(msg)):
                sid, start, count, flags, alpha = (next(msg) for _ in range(5))
                seq = seqs.get(sid)
                if seq is None:
                    seq = seqs[sid] = self.new_sequence()
                if start > len(seq):
                    raise DistributedError(
                        f"rank {self.channel.rank} holds {len(seq)} positions of sequence {sid}, "
                        f"rank 0 continues it at {start}"
                    )
                seq.trim(len(seq) - start)
                seq.ntk_alpha = _bits_float(alpha) if flags & 2 else None
                segments.append((seq, [next(msg) for _ in range(count)]))
                every.append(bool(flags & 1))
            self.forward(segments, all_logits=every, hidden=hidden)


def parallel_engine(model: nn.Module, *, kv_cache: str = "float") -> Engine:
    """The engine for a tensor-parallel ``model`` on this rank: the leader on rank 0, a
    follower elsewhere. Every rank must call it at the same point (it creates a group)."""
    channel = StepChannel()
    cls = LeaderEngine if channel.rank == 0 else FollowerEngine
    return cls(model, channel, kv_cache=kv_cache)
