"""The inference engine: sequences with their own KV caches, run together in ragged batches.

One forward pass takes any mix of segments, each a few new tokens of one sequence: a prompt
piece, one decode token, a speculative draft to verify. Their tokens are flattened into one
row, every linear layer runs once over all of them, and attention is computed per segment
against that sequence's own cache (:class:`BatchLayer`, the cache protocol's ragged-batch
implementation). The engine calls the model's own forward; it knows nothing of tokenizers,
sampling or HTTP.

**One numeric path.** A token's logits must not depend on what it was batched with or which
surface asked for it. The engine keeps two kinds of forward pass apart:

- *Row-exact steps* of at most ``SMALL_SEGMENT`` rows (decode tokens, draft verification,
  short prompt tails): the kernel-backed linear layers and the attention compute each row on
  its own, so a row's numbers are the same alone or beside 15 others.
- *Prefill pieces*: one sequence alone, cut at fixed multiples of ``prefill_chunk`` positions
  (:meth:`Engine.prefill_piece`), through fast matrix multiplies. The same prompt is therefore
  always cut the same way, whatever else is running. Where the native forward takes pieces of
  any length (:meth:`Engine.row_exact_prefill`: GGUF formats, tiled int8) every row is
  computed on its own there too, and a piece may be fed in parts between other work.

So ``qwenlm generate``, the Python API, the server under load, the evaluator and speculative
decoding give the same tokens. The prefix cache reuses only whole pieces at those boundaries
(``SequenceState.exact``), so a cache hit changes no number either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch
from torch import nn

from qwenlm.generation.cache import SequenceCache, SequenceState
from qwenlm.generation.sampling import remember_greedy
from qwenlm.models.attention import AttentionPlan
from qwenlm.models.rope import ntk_alpha
from qwenlm.quant.linear import SMALL_BATCH

if TYPE_CHECKING:
    from qwenlm.lora import Adapter, AdapterRouter

SMALL_SEGMENT = SMALL_BATCH
# Prompts are prefilled in pieces ending at multiples of this many positions: bounded
# activation memory, and the same cut for the same prompt on every surface.
PREFILL_CHUNK = 512
# The KV cache's formats: float (the attention's own dtype), float16, int8 rows with scales.
KV_CACHE_FORMATS = ("float", "f16", "int8")
# What `qwenlm.load` and the CLI accept: a format, or auto (see qwenlm.api.resolve_kv_cache).
KV_CACHE_CHOICES = ("auto", *KV_CACHE_FORMATS)


class BatchLayer:
    """One attention layer's view of a ragged batch: routes each segment to its sequence."""

    def __init__(
        self, layer: int, layout: list[tuple[SequenceState, int, int]], *, native: bool = True
    ) -> None:
        # The native decode path (fastpath.KernelLayer) reads `layer` and `layout` directly.
        self.layer = layer
        self.layout = layout  # (sequence, first row in the flattened batch, tokens)
        # Whether the fused native layer may compute this batch: not when rows carry LoRA
        # adapters, whose deltas only the PyTorch layers (lora.AdapterLinear) add.
        self.native = native

    def attend(
        self,
        q: torch.Tensor | tuple[torch.Tensor, ...],
        k: torch.Tensor,
        v: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        # q: (1, H, N, D) or its dual-chunk rotations; k, v: (1, Hkv, N, D), N flattened tokens
        qs = q if isinstance(q, tuple) else (q,)
        out = torch.empty_like(qs[0])
        for seq, start, T in self.layout:
            past = seq.cache.length
            rows = slice(start, start + T)
            seq.cache.write(self.layer, past, k[0, :, rows], v[0, :, rows])
            K, V = seq.cache.read(self.layer, past + T)
            part = tuple(x[:, :, rows] for x in qs)
            if T > SMALL_SEGMENT or K.device.type != "cpu":
                out[:, :, rows] = plan.attend(part if len(part) > 1 else part[0], K[None], V[None])
                continue
            for t in range(T):
                # One query over exactly the keys it may see, as a decode step computes it.
                n = past + t + 1
                row = tuple(x[:, :, t : t + 1] for x in part)
                if plan.ordinary:
                    out[0, :, start + t] = _attend_row(row[0][0, :, 0], K[:, :n], V[:, :n])
                else:
                    out[:, :, start + t : start + t + 1] = plan.attend(
                        row if len(row) > 1 else row[0], K[None, :, :n], V[None, :, :n]
                    )
        return out


def _adapter_rows(
    layout: list[tuple[SequenceState, int, int]], device: torch.device
) -> list[tuple[Adapter, torch.Tensor]]:
    """(adapter, its rows in the flattened batch) for the segments whose sequence has one."""
    rows: dict[int, tuple[Adapter, list[int]]] = {}
    for seq, start, T in layout:
        if seq.adapter is not None:
            rows.setdefault(id(seq.adapter), (seq.adapter, []))[1].extend(range(start, start + T))
    return [(a, torch.tensor(r, device=device)) for a, r in rows.values()]


def _attend_row(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """q (H, D) over K, V (Hkv, n, D): grouped as (Hkv, group, D) x (Hkv, D, n)."""
    H, D = q.shape
    Hkv = K.shape[0]
    qg = q.view(Hkv, H // Hkv, D)
    scores = torch.matmul(qg, K.transpose(1, 2)) * (1.0 / math.sqrt(D))
    return torch.matmul(scores.softmax(-1), V).view(H, D)


class Engine:
    """Runs a model over ragged batches of sequences; owns no model state beyond a reference."""

    def __init__(
        self,
        model: nn.Module,
        *,
        kv_cache: str = "float",
        cuda_graphs: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        """``kv_cache="f16"`` stores keys and values as float16 (half the bytes of float32
        on the CPU, whose attention still computes in float32), ``"int8"`` as int8 rows with
        a scale each; ``cuda_graphs`` replays recorded one-token decode steps on CUDA
        devices."""
        if kv_cache not in KV_CACHE_FORMATS:
            raise ValueError(
                f"kv_cache must be one of {', '.join(KV_CACHE_FORMATS)}, got {kv_cache!r}"
            )
        if prefill_chunk <= SMALL_SEGMENT:
            raise ValueError(f"prefill_chunk must be above {SMALL_SEGMENT}, got {prefill_chunk}")
        self.model = model
        self.kv_cache = kv_cache
        self.config = model.config
        self.prefill_chunk = prefill_chunk
        p = next(model.parameters(), None)
        if p is None:
            p = next(model.buffers())
        self.device = p.device
        # Attention computes in float32 on CPU, where bfloat16 attention is ~10x slower.
        self.compute_dtype = (
            torch.float32 if self.device.type == "cpu" else model.model.embed_tokens.weight.dtype
        )
        self.kv_dtype = torch.float16 if kv_cache == "f16" else self.compute_dtype
        # A tensor-parallel rank caches its own key/value heads only (qwenlm.parallel).
        shard = getattr(model, "shard", None)
        self.kv_heads = shard.kv_heads if shard is not None else self.config.num_key_value_heads
        self.dynamic_ntk = bool(model.model.rotary_emb.dynamic_ntk)
        # Per-request LoRA (lora.AdapterRouter), when the model's layers are wrapped for it.
        self.adapters: AdapterRouter | None = None
        self.ntk_seq_length = self.config.seq_length or self.config.max_position_embeddings
        # One-token steps of one sequence replay a recorded CUDA graph (float KV cache only).
        self.graphs = None
        if self.device.type == "cuda" and kv_cache == "float" and cuda_graphs:
            from qwenlm.generation.cuda_graphs import GraphDecoder

            self.graphs = GraphDecoder(self)
        # Small batches on the CPU kernels: a whole forward pass in one native call, where
        # fastpath.accelerate gave the model one.
        self.native = getattr(model, "native_forward", None) if self.device.type == "cpu" else None

    def new_sequence(self) -> SequenceState:
        c = self.config
        cache = SequenceCache(
            c.num_hidden_layers,
            self.kv_heads,
            c.head_dim,
            self.kv_dtype,
            self.device,
            quantized=self.kv_cache == "int8",
            compute_dtype=self.compute_dtype,
        )
        if self.graphs is not None:
            cache.step = 1024  # each capacity change records a new graph
        return SequenceState(cache)

    def fork(self, seq: SequenceState) -> SequenceState:
        """A copy of ``seq`` with its own cache (the other choices of a request share a prompt)."""
        new = self.new_sequence()
        new.cache.copy_from(seq.cache, len(seq))
        new.tokens = list(seq.tokens)
        new.exact, new.ntk_alpha, new.adapter = seq.exact, seq.ntk_alpha, seq.adapter
        return new

    # -- prompts ------------------------------------------------------------------------------
    def begin(self, seq: SequenceState, prompt: Seq[int], *, exact: bool = True) -> list[int]:
        """Make ``seq`` ready to prefill ``prompt``: keep the cached prefix it may reuse (only
        chunk-exact positions when ``exact``); returns the tokens still to feed."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if self.dynamic_ntk:
            # Qwen1 fixes dynamic NTK's factor from the prompt's length at prefill; keys
            # rotated with another factor cannot be reused.
            alpha = float(ntk_alpha(len(prompt), self.ntk_seq_length))
            if seq.ntk_alpha != alpha:
                seq.reset()
                seq.ntk_alpha = alpha
        n = seq.reuse(prompt, exact=exact, chunk=self.prefill_chunk)
        return list(prompt[n:])

    def row_exact_prefill(self, seq: SequenceState) -> bool:
        """Whether ``seq``'s prompt runs on the row-exact native path at any length (every
        projection takes any number of rows on the kernels, no adapter): each position's
        numbers then do not depend on how its piece is cut, and a piece may be fed in parts
        (``prefill_part(most=...)``) between other work."""
        native = self.native
        return native is not None and seq.adapter is None and native.piece_rows() is not None

    def prefill_part(
        self, seq: SequenceState, pending: Seq[int], most: int | None = None
    ) -> list[int]:
        """The tokens of ``pending`` the next prefill forward feeds: up to the next multiple of
        ``prefill_chunk`` positions, or at most ``most`` of them, only where
        :meth:`row_exact_prefill` holds (the rest comes later, with the same numbers). Feed
        them with :meth:`forward`, then call :meth:`prefill_fed`."""
        start = len(seq)
        end = (start // self.prefill_chunk + 1) * self.prefill_chunk
        if most is not None and not self.row_exact_prefill(seq):
            raise ValueError("a prefill piece is fed in parts only on the row-exact path")
        return list(pending[: end - start if most is None else min(most, end - start)])

    def prefill_fed(self, seq: SequenceState, n: int, *, part: bool = False) -> None:
        """Note that ``seq`` took the ``n`` tokens :meth:`prefill_part` gave (``part``: with
        ``most``), for the prefix cache's exactness (``SequenceState.exact``)."""
        start, chunk = len(seq) - n, self.prefill_chunk
        if part:
            if seq.exact == start:  # row-exact: each position is what a fresh prefill computes
                seq.exact = len(seq)
        elif seq.exact == start and start % chunk == 0 and len(seq) == start + chunk:
            # a whole piece at the fixed boundaries: what a fresh prefill computes
            seq.exact = len(seq)

    def prefill_piece(
        self,
        seq: SequenceState,
        pending: Seq[int],
        *,
        all_logits: bool = False,
        most: int | None = None,
    ) -> tuple[int, torch.Tensor]:
        """Feed the next piece of ``pending`` (up to the next multiple of ``prefill_chunk``
        positions, or at most ``most`` tokens of it: :meth:`prefill_part`), alone in its
        forward pass; returns (tokens fed, its logits)."""
        piece = self.prefill_part(seq, pending, most)
        (logits,) = self.forward([(seq, piece)], all_logits=all_logits)
        self.prefill_fed(seq, len(piece), part=most is not None)
        return len(piece), logits

    def prefill(
        self,
        seq: SequenceState,
        prompt: Seq[int],
        *,
        exact: bool = True,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Feed ``prompt`` (what ``seq`` does not already hold) piece by piece; returns the
        logits after its last token (vocab,), or of every fed token with ``all_logits``."""
        pending = self.begin(seq, prompt, exact=exact)
        parts = []
        while pending:
            n, logits = self.prefill_piece(seq, pending, all_logits=all_logits)
            pending = pending[n:]
            parts.append(logits)
        return torch.cat(parts) if all_logits else parts[-1]

    # -- the forward pass ---------------------------------------------------------------------
    def forward(
        self,
        segments: Seq[tuple[SequenceState, Seq[int]]],
        *,
        all_logits: bool | Seq[bool] = False,
        hidden: bool = False,
    ) -> list[torch.Tensor]:
        """Feed each sequence its new tokens; return float32 logits per segment.

        Each result is (vocab,) for the segment's last token, or (tokens, vocab) where
        ``all_logits`` (one flag, or one per segment) asks for every row. ``hidden`` returns
        the model's final (normed) hidden states, (hidden,) or (tokens, hidden), instead of
        logits: what embeddings pool. The tokens become part of their sequences.
        """
        every = [all_logits] * len(segments) if isinstance(all_logits, bool) else all_logits
        if (
            self.graphs is not None
            and len(segments) == 1
            and len(segments[0][1]) == 1
            and not every[0]
            and not hidden
            and segments[0][0].adapter is None
        ):
            seq, (token,) = segments[0]
            seq.cache.reserve(len(seq) + 1)
            with torch.inference_mode():
                logits = self.graphs.step(seq.cache, int(token), len(seq), seq.ntk_alpha)
            seq.tokens.append(int(token))
            seq.cache.length = len(seq.tokens)
            return [logits]
        ids: list[int] = []
        positions: list[int] = []
        alphas: list[float] = []
        layout: list[tuple[SequenceState, int, int]] = []
        for seq, tokens in segments:
            if not tokens:
                raise ValueError("a segment needs at least one token")
            seq.cache.reserve(len(seq) + len(tokens))
            layout.append((seq, len(ids), len(tokens)))
            positions.extend(range(len(seq), len(seq) + len(tokens)))
            if self.dynamic_ntk:
                alpha = seq.ntk_alpha
                if alpha is None:  # fed without begin(): the sequence so far is its prompt
                    alpha = seq.ntk_alpha = float(
                        ntk_alpha(len(seq) + len(tokens), self.ntk_seq_length)
                    )
                alphas.extend([alpha] * len(tokens))
            ids.extend(tokens)
        groups = _adapter_rows(layout, self.device) if self.adapters is not None else []
        rows: list[int] = []
        spans = []  # each segment's rows in the logits
        for (_, start, T), full in zip(layout, every, strict=True):
            first = start if full else start + T - 1
            spans.append((len(rows), full))
            rows.extend(range(first, start + T))
        best = None  # each logits row's greedy token, where the native head found it
        with torch.inference_mode():
            native = self.native if not hidden and not groups else None
            got = native.logits(layout, ids, positions, rows) if native is not None else None
            if got is not None:
                logits, best = got
            else:
                logits = self._model_forward(layout, ids, positions, alphas, rows, groups, hidden)
        for seq, tokens in segments:
            seq.tokens.extend(int(t) for t in tokens)
            seq.cache.length = len(seq.tokens)
        if best is not None:
            remember_greedy(logits, best)
            if len(best) == 1:  # one segment, one row: made as (vocab,)
                return [logits[None] if every[0] else logits]
        return [
            logits[i : i + T] if full else logits[i]
            for (i, full), (_, _, T) in zip(spans, layout, strict=True)
        ]

    def _model_forward(
        self,
        layout: list[tuple[SequenceState, int, int]],
        ids: list[int],
        positions: list[int],
        alphas: list[float],
        rows: list[int],
        groups: list,
        hidden: bool,
    ) -> torch.Tensor:
        """The model's own forward over the flattened batch: logits (or final hidden states)
        of batch rows ``rows``, float32."""
        dev = self.device
        x = torch.tensor([ids], device=dev)
        pos = torch.tensor([positions], device=dev)
        alpha_t = torch.tensor([alphas], device=dev) if self.dynamic_ntk else None
        at = None if len(rows) == len(ids) else torch.tensor(rows, device=dev)
        views = [
            BatchLayer(i, layout, native=not groups) for i in range(self.config.num_hidden_layers)
        ]
        if groups:
            self.adapters.groups = groups
        try:
            if hidden:
                h = self.model.model(x, views, pos, ntk_alpha=alpha_t)[0]  # (N, hidden)
                return (h if at is None else h[at]).float()
            logits = self.model(x, views, positions=pos, ntk_alpha=alpha_t, logits_at=at)
            return logits[0].float()
        finally:
            if self.adapters is not None:
                self.adapters.groups = []
