"""Attention: the plan each layer attends by, the cache protocol, and long-context variants.

The model builds one :class:`AttentionPlan` per layer and forward pass (positions, LogN,
sliding window, dual chunk attention, an explicit mask) and hands it, with the rotated queries
and keys, to the layer's cache through the one cache protocol, :class:`LayerCache`. Caches
store keys and values their own way and attend through the plan, so every kind of cache
(plain, the engine's ragged batches, CUDA graphs, none) computes the same attention.

Window and dual chunk attention compute block by block with an online softmax (flash-style),
so a long input never materialises a T x S score matrix: peak extra memory is ``block x
block`` scores per head.

Dual Chunk Attention (An et al. 2024, as in Qwen2.5-1M's ``dual_chunk_attention_config``) keeps
every relative position the model sees below the chunk size: keys sit at ``p mod L``
(``L = chunk_size - local_size``); a query at ``p`` attends to its own chunk at ``p mod L``,
to the previous chunk at ``min(p mod L + L, chunk_size)`` and to older chunks at
``min(2L - 1, chunk_size)``, all under one softmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError, GenerationError
from qwenlm.models.rope import logn_scale

BLOCK = 512


@dataclass(frozen=True)
class DualChunk:
    chunk_size: int
    local_size: int

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    @classmethod
    def from_config(cls, config: ModelConfig) -> DualChunk | None:
        c = config.dual_chunk_attention_config
        if not c:
            return None
        try:
            dc = cls(int(c["chunk_size"]), int(c.get("local_size", 0)))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                "config: dual_chunk_attention_config needs an integer chunk_size"
            ) from None
        if not 0 <= dc.local_size < dc.chunk_size:
            raise CheckpointError(
                f"config: dual chunk local_size {dc.local_size} must be below chunk_size "
                f"{dc.chunk_size}"
            )
        return dc

    def query_positions(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary positions of a query at ``p`` for its own, the previous and older chunks."""
        L = self.chunk_len
        intra = p % L
        succ = (intra + L).clamp(max=self.chunk_size)
        inter = torch.full_like(p, min(2 * L - 1, self.chunk_size))
        return intra, succ, inter


def blockwise_attention(
    q: torch.Tensor | tuple[torch.Tensor, ...],
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    window: int | None = None,
    chunk_len: int | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """Causal attention of queries at positions ``q_pos`` (T,) over keys at 0..S-1.

    ``q`` is (B, H, T, D), or three such tensors (own chunk, previous chunk, older chunks) for
    dual chunk attention with chunks of ``chunk_len``. ``k``, ``v``: (B, Hkv, S, D). A key j
    is visible to a query at p when j <= p and, with ``window``, p - j < window. Returns
    (B, H, T, D). Scores exist one (block x block) tile at a time.
    """
    qs = q if isinstance(q, tuple) else (q,)
    B, H, T, D = qs[0].shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = D**-0.5
    qs = tuple(x.reshape(B, Hkv, g, T, D) for x in qs)  # query heads grouped by their KV head
    out = torch.empty(B, Hkv, g, T, D, dtype=v.dtype, device=v.device)
    k_all = torch.arange(S, device=k.device)
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        qp = q_pos[t0:t1]
        m = torch.full((B, Hkv, g, t1 - t0, 1), float("-inf"), device=v.device)
        den = torch.zeros_like(m)
        acc = torch.zeros(B, Hkv, g, t1 - t0, D, device=v.device)
        lo = 0 if window is None else max(0, int(qp.min()) - window + 1)
        hi = min(int(qp.max()) + 1, S)
        for s0 in range((lo // block) * block, hi, block):
            s1 = min(s0 + block, hi)
            kb = k[:, :, None, s0:s1]  # (B, Hkv, 1, tk, D)
            kp = k_all[s0:s1]
            seen = kp[None, :] <= qp[:, None]  # (tq, tk)
            if window is not None:
                seen &= qp[:, None] - kp[None, :] < window
            if not bool(seen.any()):
                continue
            if chunk_len is None:
                s = torch.matmul(qs[0][..., t0:t1, :], kb.transpose(-1, -2))
            else:
                # Pick, per (query, key) pair, the query rotated for their chunk distance.
                gap = (qp[:, None] // chunk_len - kp[None, :] // chunk_len).clamp(0, 2)
                s = torch.stack(
                    [torch.matmul(x[..., t0:t1, :], kb.transpose(-1, -2)) for x in qs]
                )  # (3, B, Hkv, g, tq, tk)
                s = s.gather(0, gap.expand(1, *s.shape[1:]).long())[0]
            s = (s.float() * scale).masked_fill(~seen, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            # Rows that have seen no key yet keep -inf; shift them by 0 instead (no NaNs).
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - shift)
            corr = torch.exp(m - shift)
            den = den * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + torch.matmul(p.to(v.dtype), v[:, :, None, s0:s1]).float()
            m = m_new
        out[..., t0:t1, :] = (acc / den).to(v.dtype)
    return out.reshape(B, H, T, D)


# On CPU, a chunk of queries after cached keys is attended in blocks of this many queries: the
# explicit mask sends SDPA to a path that materialises (heads, T, S) scores, and blocks bound
# that to ~15 MB (14 heads x 128 x 2048 floats for the 0.5B).
_MASKED_QUERY_BLOCK = 128


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split ("NeoX") layout: x (B, H, T, D); cos, sin (B, T, D) or
    (T, D)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass(frozen=True)
class AttentionPlan:
    """How one layer attends in one forward pass: built by the model, read by the cache.

    ``positions`` (B, T) are the new tokens' positions. ``window``, ``dual_chunk`` and LogN
    (``q_scale``, (B, T)) come from the config; ``mask`` is an explicit boolean mask for padded
    or packed batches without a cache. Window and dual chunk attention switch on per attended
    sequence, only once it is longer than the window or the chunk: a sequence's numbers never
    depend on how long its batch-mates are.
    """

    positions: torch.Tensor
    window: int | None = None
    dual_chunk: DualChunk | None = None
    q_scale: torch.Tensor | None = None
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    mask: torch.Tensor | None = None
    block: int = BLOCK

    @property
    def ordinary(self) -> bool:
        """Plain causal attention over every cached key: what the native decode path computes."""
        return (
            self.window is None
            and self.dual_chunk is None
            and self.q_scale is None
            and self.mask is None
        )

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """Rotary embedding (and LogN scaling) of q, k (B, H, T, D).

        Under dual chunk attention keys sit at ``p mod L`` and the query comes in three
        rotations (own, previous and older chunks); below one chunk the first rotation and the
        keys equal the ordinary ones bit for bit, so short sequences attend as without it.
        """
        if self.dual_chunk is None:
            qs: tuple[torch.Tensor, ...] = (rotate(q, cos, sin),)
            k = rotate(k, cos, sin)
        else:
            dc, pos = self.dual_chunk, self.positions
            k = rotate(k, *self.rotary(pos % dc.chunk_len))
            qs = tuple(rotate(q, *self.rotary(p)) for p in dc.query_positions(pos))
        if self.q_scale is not None:
            s = self.q_scale[:, None, :, None].to(q.dtype)
            qs = tuple(x * s for x in qs)
        return (qs[0] if len(qs) == 1 else qs), k

    def attend(
        self, q: torch.Tensor | tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Attention of the last T of S positions: q (B, H, T, D) as :meth:`rotate` gave it,
        k, v (B, Hkv, S, D) every key so far. Returns (B, H, T, D)."""
        qs = q if isinstance(q, tuple) else (q,)
        T, S = qs[0].shape[2], k.shape[2]
        dc = (
            self.dual_chunk
            if self.dual_chunk is not None and self.dual_chunk.chunk_len < S
            else None
        )
        window = self.window if self.window is not None and self.window < S else None
        if dc is None and window is None:
            return sdpa(qs[0], k, v, mask=self.mask)
        return blockwise_attention(
            qs if dc is not None else qs[0],
            k,
            v,
            torch.arange(S - T, S, device=k.device),
            window=window,
            chunk_len=dc.chunk_len if dc is not None else None,
            block=self.block,
        )


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention of the last T of S positions (q (B, H, T, D); k, v (B, Hkv, S, D))."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.device.type == "cuda" and T > 1:
        # Flash attention takes grouped heads only as repeated copies.
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    if mask is not None or T == 1 or T == S:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa
        )
    # A chunk after cached keys needs an explicit mask; on CPU its queries go in blocks.
    out = torch.empty_like(q)
    block = _MASKED_QUERY_BLOCK if q.device.type == "cpu" else T
    for a in range(0, T, block):
        b = min(T, a + block)
        n = S - T + b  # keys the block's last query sees
        rows = torch.arange(S - T + a, n, device=q.device)[:, None]
        m = torch.arange(n, device=q.device)[None, :] <= rows
        out[:, :, a:b] = F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, :n], v[:, :, :n], attn_mask=m, enable_gqa=gqa
        )
    return out


class LayerCache(Protocol):
    """What attention needs from a key/value cache: the one cache protocol of qwenlm.

    One object per layer is passed into the model. ``attend`` stores the new keys and values
    (k, v: (B, Hkv, T, D), rotated) and returns the attention output (B, H, T, D) of the
    queries ``q`` (as :meth:`AttentionPlan.rotate` gave them) over everything stored, computed
    with ``plan`` (usually ``plan.attend`` on the stored keys). The plain cache
    (``qwenlm.generation.cache.KVCache``), the engine's ragged batches and the CUDA-graph decode
    step implement it.
    """

    def attend(
        self,
        q: torch.Tensor | tuple[torch.Tensor, ...],
        k: torch.Tensor,
        v: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor: ...


class SequentialCache(LayerCache, Protocol):
    """A cache of one sequence (or a batch of equal-length ones) that knows its length, so the
    model can number new tokens without being given positions. ``ntk_alpha`` is dynamic NTK's
    factor, fixed when the cache is first filled (Qwen1 fixes it at prefill)."""

    offset: int
    ntk_alpha: float | None


class NoCache:
    """Attention without a cache (a full forward pass): keys and values are the new ones."""

    def attend(
        self,
        q: torch.Tensor | tuple[torch.Tensor, ...],
        k: torch.Tensor,
        v: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        return plan.attend(q, k, v)


NO_CACHE = NoCache()


def make_plans(
    config: ModelConfig,
    positions: torch.Tensor,
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    training: bool,
    mask: torch.Tensor | None = None,
) -> list[AttentionPlan]:
    """One plan per layer for queries at ``positions`` (B, T); layers that attend alike share
    one."""
    q_scale = None
    if config.use_logn_attn and not training:  # Qwen1 scales only at inference
        q_scale = logn_scale(positions, config.seq_length or config.max_position_embeddings)
    dual_chunk = DualChunk.from_config(config)
    if (dual_chunk is not None or any_window(config)) and mask is not None:
        raise GenerationError("window and dual chunk attention do not take an explicit mask")
    plans: dict[int | None, AttentionPlan] = {}
    out = []
    for i in range(config.num_hidden_layers):
        window = config.window_of_layer(i)
        if window not in plans:
            plans[window] = AttentionPlan(
                positions=positions,
                window=window,
                dual_chunk=dual_chunk,
                q_scale=q_scale,
                rotary=rotary if dual_chunk is not None else None,
                mask=mask,
                # Larger tiles on accelerators, where each tile is a few kernel launches.
                block=BLOCK if positions.device.type == "cpu" else 4 * BLOCK,
            )
        out.append(plans[window])
    return out


def any_window(config: ModelConfig) -> bool:
    return any(config.window_of_layer(i) for i in range(config.num_hidden_layers))
