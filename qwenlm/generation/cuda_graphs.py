"""One-token decode steps replayed from CUDA graphs.

A decode step of a small model on a GPU is hundreds of tiny kernels, and launching them from
Python costs more than running them. A CUDA graph records the step once and replays it with one
launch. Replay needs fixed shapes and addresses, so the graph's attention reads the sequence's
whole key/value buffer (its capacity) under a mask of the positions filled so far, and the token
and position are copied into fixed input tensors before each replay. A graph belongs to one
sequence cache at one capacity; growing the cache records a new one (capacity grows
geometrically, so that happens a handful of times per sequence).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qwenlm.models.attention import AttentionPlan

if TYPE_CHECKING:
    from qwenlm.generation.cache import SequenceCache
    from qwenlm.generation.engine import Engine


class _GraphLayer:
    """The cache view one attention layer sees inside a recorded decode step."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
    ) -> None:
        self.keys, self.values, self.pos, self.mask = keys, values, pos, mask

    def attend(
        self,
        q: torch.Tensor | tuple[torch.Tensor, ...],
        k: torch.Tensor,
        v: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        # q: (1, H, 1, D); k, v: (1, Hkv, 1, D). Write this position, attend over the filled ones.
        # Graphs are recorded only for plain attention (models.cuda_graph_safe), so q is one
        # tensor and the plan adds nothing to the fixed mask.
        assert isinstance(q, torch.Tensor)
        self.keys.index_copy_(1, self.pos, k[0])
        self.values.index_copy_(1, self.pos, v[0])
        return F.scaled_dot_product_attention(
            q,
            self.keys[None],
            self.values[None],
            attn_mask=self.mask,
            enable_gqa=q.shape[1] != k.shape[1],
        )


class _Recorded:
    def __init__(self, engine: Engine, cache: SequenceCache) -> None:
        device = engine.device
        self.capacity = cache.capacity
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        # Dynamic NTK's factor of the sequence (fixed at its prefill), an input like the token.
        self.alpha = torch.ones(1, 1, device=device)
        dynamic = engine.dynamic_ntk
        self.arange = torch.arange(self.capacity, device=device)
        model = engine.model
        # The buffers, not the cache object: the cache is this record's weak key.
        keys, values = list(cache.keys), list(cache.values)

        def step() -> torch.Tensor:
            mask = (self.arange <= self.pos)[None, None, None, :]
            views = [_GraphLayer(k, v, self.pos, mask) for k, v in zip(keys, values, strict=True)]
            alpha = self.alpha if dynamic else None
            return model(self.token, views, positions=self.pos[None], ntk_alpha=alpha).float()[
                0, -1
            ]

        # Warm up on a side stream (allocator, cuBLAS workspaces), as graph capture requires.
        # The warm-up writes keys at the last position, past the filled part, which a real step
        # overwrites before any query can see it.
        self.pos.fill_(cache.capacity - 1)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = step()

    def run(self, token: int, pos: int, alpha: float | None) -> torch.Tensor:
        self.token.fill_(token)
        self.pos.fill_(pos)
        self.alpha.fill_(1.0 if alpha is None else alpha)
        self.graph.replay()
        return self.logits.clone()


class GraphDecoder:
    """Per-sequence recorded decode steps for one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._graphs: weakref.WeakKeyDictionary[SequenceCache, _Recorded] = (
            weakref.WeakKeyDictionary()
        )

    def step(
        self, cache: SequenceCache, token: int, pos: int, alpha: float | None = None
    ) -> torch.Tensor:
        """Logits (vocab,) for ``token`` at position ``pos`` (dynamic NTK factor ``alpha``);
        stores its keys and values."""
        rec = self._graphs.get(cache)
        if rec is None or rec.capacity != cache.capacity:
            rec = self._graphs[cache] = _Recorded(self.engine, cache)
        return rec.run(token, pos, alpha)
