"""Long-context attention: LogN scaling, sliding windows, Dual Chunk Attention, chunked compute.

The model builds one :class:`AttentionPlan` per layer when its config turns one of these on, and
hands it to the attention module in place of the mask. Plans compute attention block by block
with an online softmax (flash-style), so a long input never materialises a T x S score matrix:
peak extra memory is ``block x block`` scores per head.

Dual Chunk Attention (An et al. 2024, as in Qwen2.5-1M's ``dual_chunk_attention_config``) keeps
every relative position the model sees below the chunk size: keys sit at ``p mod L``
(``L = chunk_size - local_size``); a query at ``p`` attends to its own chunk at ``p mod L``,
to the previous chunk at ``min(p mod L + L, chunk_size)`` and to older chunks at
``min(2L - 1, chunk_size)``, all under one softmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError, GenerationError
from qwenlm.models.rope import logn_scale

BLOCK = 512


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D) or (B, T, D)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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


@dataclass
class AttentionPlan:
    """How one layer attends when long-context features are on (passed where the mask goes)."""

    positions: torch.Tensor  # (T,) positions of the queries, the same in every batch row
    offset: int  # cached positions before these queries (plain caches)
    window: int | None = None
    q_scale: torch.Tensor | None = None  # (T,) LogN factors
    dual_chunk: DualChunk | None = None
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    block: int = BLOCK

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: object | None,
    ) -> torch.Tensor:
        """Rotate q, k (B, H, T, D) and attend, storing k, v in ``cache``; returns (B, H, T, D)."""
        T = q.shape[2]
        dc, window = None, None
        if self.dual_chunk is not None or self.window is not None:
            last = int(self.positions.max()) + 1  # LogN alone needs no host round trip
            if self.dual_chunk is not None and last > self.dual_chunk.chunk_len:
                dc = self.dual_chunk
            if self.window is not None and last > self.window:
                window = self.window
        if dc is None:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        else:
            # Keys at p mod L; the query in three rotations, chosen per key chunk below.
            k = _rotate(k, *self.rotary(self.positions % dc.chunk_len))
            qs = tuple(_rotate(q, *self.rotary(p)) for p in dc.query_positions(self.positions))
        if self.q_scale is not None:
            s = self.q_scale[None, None, :, None].to(q.dtype)
            if dc is None:
                q = q * s
            else:
                qs = tuple(x * s for x in qs)
        if cache is not None and hasattr(cache, "attend"):
            if dc is None and window is None:
                return cache.attend(q, k, v)
            # The engine's caches: each sequence attends blockwise over its own keys.
            return cache.attend_blockwise(
                qs if dc is not None else q,
                k,
                v,
                window=window,
                chunk_len=dc.chunk_len if dc is not None else None,
                block=self.block,
            )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, S, D)
        if dc is None and window is None:
            # Exactly the ordinary path, so a plan that changes nothing changes no bit.
            mask = None
            if self.offset > 0 and T > 1:
                rows = self.positions[:, None]
                mask = torch.arange(self.offset + T, device=q.device)[None, :] <= rows
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        return blockwise_attention(
            qs if dc is not None else q,
            k,
            v,
            self.positions,
            window=window,
            chunk_len=dc.chunk_len if dc is not None else None,
            block=self.block,
        )


def needs_plans(config: ModelConfig, training: bool = False) -> bool:
    """Whether the config turns on attention the ordinary path lacks (LogN only at inference)."""
    windows = any(config.window_of_layer(i) for i in range(config.num_hidden_layers))
    logn = config.use_logn_attn and not training
    return bool(logn or windows or config.dual_chunk_attention_config)


def make_plans(
    config: ModelConfig,
    positions: torch.Tensor,
    offset: int,
    rotary: nn.Module,
    training: bool,
) -> list[AttentionPlan]:
    """One plan per layer for queries at ``positions`` (B, T) after ``offset`` cached ones."""
    if positions.shape[0] > 1 and not bool((positions == positions[:1]).all()):
        raise GenerationError("long-context attention needs the same positions in every row")
    pos = positions[0]
    q_scale = None
    if config.use_logn_attn and not training:  # Qwen1 scales only at inference
        q_scale = logn_scale(pos, config.seq_length or config.max_position_embeddings)
    dual_chunk = DualChunk.from_config(config)
    return [
        AttentionPlan(
            positions=pos,
            offset=offset,
            window=config.window_of_layer(i),
            q_scale=q_scale,
            dual_chunk=dual_chunk,
            rotary=lambda p: rotary(p[None]),
            # Larger tiles on accelerators, where each tile is a few kernel launches.
            block=BLOCK if pos.device.type == "cpu" else 4 * BLOCK,
        )
        for i in range(config.num_hidden_layers)
    ]
