"""The inference engine: sequences with their own KV caches, run together in ragged batches.

One forward pass takes any mix of segments, each a few new tokens of one sequence: a prompt
being prefilled, one decode token, a speculative draft to verify. Their tokens are flattened
into one row, so every linear layer runs once over all of them, and attention is computed per
segment against that sequence's own cache. This is what batched generation, speculative
decoding and a serving loop with continuous batching are built on.

Decode-sized segments (at most ``SMALL_SEGMENT`` tokens) compute attention one query at a
time over exactly the keys it may see, with the same operations whatever else is in the batch,
and the kernel-backed linear layers do the same per row: a token's logits do not depend on
what it was batched with, so batched and speculative greedy decoding equal plain decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F
from torch import nn

from qwenlm.quant.linear import SMALL_BATCH

SMALL_SEGMENT = SMALL_BATCH
_MASKED_QUERY_BLOCK = 128


class SequenceCache:
    """Keys and values of one sequence for every layer: (kv_heads, capacity, head_dim) buffers.

    With ``quantized=True`` each stored row (one head, one position) is int8 codes plus a
    float scale (``key_scales``, ``value_scales``: (kv_heads, capacity)), a quarter of the
    float32 memory. Capacity grows geometrically in steps of ``step`` positions.
    """

    step = 256

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        quantized: bool = False,
    ) -> None:
        self.shape = (n_kv_heads, 0, head_dim)
        self.quantized = quantized
        self.dtype = torch.int8 if quantized else dtype
        self.device = device
        self.keys = [
            torch.empty(self.shape, dtype=self.dtype, device=device) for _ in range(n_layers)
        ]
        self.values = [
            torch.empty(self.shape, dtype=self.dtype, device=device) for _ in range(n_layers)
        ]
        n_scaled = n_layers if quantized else 0
        self.key_scales = [torch.empty(n_kv_heads, 0, device=device) for _ in range(n_scaled)]
        self.value_scales = [torch.empty(n_kv_heads, 0, device=device) for _ in range(n_scaled)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions in total."""
        if n <= self.capacity:
            return
        cap = max(n, self.capacity + self.capacity // 2)
        cap = -(-cap // self.step) * self.step
        for buffers in (self.keys, self.values, self.key_scales, self.value_scales):
            for i, old in enumerate(buffers):
                new = old.new_empty((old.shape[0], cap, *old.shape[2:]))
                new[:, : self.length] = old[:, : self.length]
                buffers[i] = new

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (kv_heads, T, head_dim) at positions pos .. pos + T - 1."""
        T = k.shape[1]
        if not self.quantized:
            self.keys[layer][:, pos : pos + T] = k
            self.values[layer][:, pos : pos + T] = v
            return
        pairs = (
            (k, self.keys[layer], self.key_scales[layer]),
            (v, self.values[layer], self.value_scales[layer]),
        )
        for x, codes, scales in pairs:
            amax = x.float().abs().amax(-1)  # (kv_heads, T)
            inv = 127.0 / amax.clamp(min=1e-30)
            codes[:, pos : pos + T] = torch.round(x.float() * inv[..., None]).to(torch.int8)
            scales[:, pos : pos + T] = amax / 127.0

    def read(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0 .. n - 1 as floats, (kv_heads, n, head_dim)."""
        K, V = self.keys[layer][:, :n], self.values[layer][:, :n]
        if not self.quantized:
            return K, V
        return (
            K.float() * self.key_scales[layer][:, :n, None],
            V.float() * self.value_scales[layer][:, :n, None],
        )

    @property
    def nbytes(self) -> int:
        groups = (self.keys, self.values, self.key_scales, self.value_scales)
        return sum(t.nbytes for group in groups for t in group)


class SequenceState:
    """A sequence being generated: the token ids whose keys and values sit in its cache."""

    def __init__(self, cache: SequenceCache) -> None:
        self.cache = cache
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def trim(self, n: int) -> None:
        """Forget the last ``n`` tokens (rejected drafts, a diverging prompt)."""
        n = min(max(n, 0), len(self.tokens))
        if n:
            del self.tokens[len(self.tokens) - n :]
            self.cache.length = len(self.tokens)

    def reuse(self, prompt: Seq[int]) -> int:
        """Keep the longest cached prefix of ``prompt`` (but at least one token to run); returns it."""
        n, limit = 0, min(len(self.tokens), len(prompt) - 1)
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        self.trim(len(self.tokens) - n)
        return n

    def reset(self) -> None:
        self.trim(len(self.tokens))


class _BatchLayer:
    """What one attention layer sees of a ragged batch: routes each segment to its sequence."""

    def __init__(
        self, layer: int, layout: list[tuple[SequenceState, int, int]], scale: float
    ) -> None:
        # The decode fast path (fastpath.KernelLayer) reads `layer` and `layout` directly.
        self.layer = layer
        self.layout = layout  # (sequence, first row in the flattened batch, tokens)
        self.scale = scale

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (1, H, N, D); k, v: (1, Hkv, N, D) for N flattened tokens
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[3]
        out = torch.empty_like(q)
        for seq, start, T in self.layout:
            past = seq.cache.length
            seq.cache.write(
                self.layer, past, k[0, :, start : start + T], v[0, :, start : start + T]
            )
            K, V = seq.cache.read(self.layer, past + T)
            if T > SMALL_SEGMENT or q.device.type != "cpu":
                # Fused attention: prefill on CPU, everything on accelerators.
                qs = q[:, :, start : start + T]
                Ks, Vs = K[None], V[None]
                gqa = Hkv != H
                if gqa and q.device.type == "cuda":
                    # Flash attention takes grouped heads only as repeated copies.
                    Ks = Ks.repeat_interleave(H // Hkv, dim=1)
                    Vs = Vs.repeat_interleave(H // Hkv, dim=1)
                    gqa = False
                if not past or T == 1:
                    out[:, :, start : start + T] = F.scaled_dot_product_attention(
                        qs, Ks, Vs, is_causal=T > 1, enable_gqa=gqa
                    )
                    continue
                # A chunk after cached tokens needs an explicit mask, which sends SDPA to a
                # path that materializes (heads, T, past + T) scores: on CPU the queries go in
                # blocks, bounding that to ~15 MB (heads x 128 x 2048 floats for the 0.5B).
                block = T if q.device.type != "cpu" else _MASKED_QUERY_BLOCK
                for a in range(0, T, block):
                    b = min(T, a + block)
                    n = past + b  # keys the block's last query sees
                    rows = torch.arange(past + a, past + b, device=q.device)[:, None]
                    mask = torch.arange(n, device=q.device)[None, :] <= rows
                    out[:, :, start + a : start + b] = F.scaled_dot_product_attention(
                        qs[:, :, a:b], Ks[:, :, :n], Vs[:, :, :n], attn_mask=mask, enable_gqa=gqa
                    )
                continue
            for t in range(T):
                # One query row over exactly the keys it may see: (Hkv, group, D) x (Hkv, D, S).
                n = past + t + 1
                qg = q[0, :, start + t].view(Hkv, H // Hkv, D)
                scores = torch.matmul(qg, K[:, :n].transpose(1, 2)) * self.scale
                out[0, :, start + t] = torch.matmul(scores.softmax(-1), V[:, :n]).view(H, D)
        return out

    def attend_blockwise(
        self,
        q: torch.Tensor | tuple[torch.Tensor, ...],
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: int | None,
        chunk_len: int | None,
        block: int,
    ) -> torch.Tensor:
        """Window or dual chunk attention (models.attention) per segment over its own cache.

        ``q`` is (1, H, N, D), or the three dual-chunk rotations of it; ``k`` as stored (for
        dual chunk attention, rotated at position mod chunk length).
        """
        from qwenlm.models.attention import blockwise_attention

        qs = q if isinstance(q, tuple) else (q,)
        out = torch.empty_like(qs[0])
        for seq, start, T in self.layout:
            past = seq.cache.length
            seq.cache.write(
                self.layer, past, k[0, :, start : start + T], v[0, :, start : start + T]
            )
            K, V = seq.cache.read(self.layer, past + T)
            parts = tuple(x[:, :, start : start + T] for x in qs)
            out[:, :, start : start + T] = blockwise_attention(
                parts if isinstance(q, tuple) else parts[0],
                K[None],
                V[None],
                torch.arange(past, past + T, device=K.device),
                window=window,
                chunk_len=chunk_len,
                block=block,
            )
        return out


class Engine:
    """Runs a model over ragged batches of sequences; owns no model state beyond a reference."""

    def __init__(
        self, model: nn.Module, *, kv_cache: str = "float", cuda_graphs: bool = True
    ) -> None:
        """``kv_cache="int8"`` stores keys and values as int8 rows with a scale each;
        ``cuda_graphs`` replays recorded one-token decode steps on CUDA devices."""
        if kv_cache not in ("float", "int8"):
            raise ValueError(f"kv_cache must be 'float' or 'int8', got {kv_cache!r}")
        self.model = model
        self.kv_cache = kv_cache
        self.config = model.config
        p = next(model.parameters(), None)
        if p is None:
            p = next(model.buffers())
        self.device = p.device
        # Keys and values stay float32 on CPU, where bfloat16 attention is ~10x slower.
        self.kv_dtype = (
            torch.float32 if self.device.type == "cpu" else model.model.embed_tokens.weight.dtype
        )
        # One-token steps of one sequence replay a recorded CUDA graph (float KV cache only).
        self.graphs = None
        if self.device.type == "cuda" and kv_cache == "float" and cuda_graphs:
            from qwenlm.generation.cuda_graphs import GraphDecoder

            self.graphs = GraphDecoder(self)

    def new_sequence(self) -> SequenceState:
        c = self.config
        cache = SequenceCache(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            self.kv_dtype,
            self.device,
            quantized=self.kv_cache == "int8",
        )
        if self.graphs is not None:
            cache.step = 1024  # each capacity change records a new graph
        return SequenceState(cache)

    def forward(
        self, segments: Seq[tuple[SequenceState, Seq[int]]], *, all_logits: bool = False
    ) -> list[torch.Tensor]:
        """Feed each sequence its new tokens; return float32 logits per segment.

        Each result is (vocab,) for the segment's last token, or (tokens, vocab) with
        ``all_logits``. The tokens become part of their sequences.
        """
        if (
            self.graphs is not None
            and len(segments) == 1
            and len(segments[0][1]) == 1
            and not all_logits
        ):
            seq, (token,) = segments[0]
            seq.cache.reserve(len(seq) + 1)
            with torch.inference_mode():
                logits = self.graphs.step(seq.cache, int(token), len(seq))
            seq.tokens.append(int(token))
            seq.cache.length = len(seq.tokens)
            return [logits]
        ids: list[int] = []
        positions: list[int] = []
        layout: list[tuple[SequenceState, int, int]] = []
        for seq, tokens in segments:
            if not tokens:
                raise ValueError("a segment needs at least one token")
            seq.cache.reserve(len(seq) + len(tokens))
            layout.append((seq, len(ids), len(tokens)))
            positions.extend(range(len(seq), len(seq) + len(tokens)))
            ids.extend(tokens)
        scale = 1.0 / math.sqrt(self.config.head_dim)
        views = [_BatchLayer(i, layout, scale) for i in range(self.config.num_hidden_layers)]
        x = torch.tensor([ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        with torch.inference_mode():
            h = self.model.model(x, views, pos)[0]  # (N, hidden)
            if all_logits:
                logits = self.model.lm_head(h).float()
                results = [logits[start : start + T] for _, start, T in layout]
            else:
                last = torch.tensor([start + T - 1 for _, start, T in layout], device=self.device)
                logits = self.model.lm_head(h[last]).float()
                results = list(logits)
        for seq, tokens in segments:
            seq.tokens.extend(tokens)
            seq.cache.length = len(seq.tokens)
        return results
