"""The plain KV cache: one object per layer, passed into the model's forward.

The engine (engine.py) keeps its own per-sequence caches; this one is for direct use of the
model, one sequence (or a same-length batch) at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenlm.config import ModelConfig


class KVCache:
    """Keys and values of one attention layer, stored in a buffer that grows in steps.

    Layout (B, kv_heads, capacity, head_dim); ``offset`` counts the valid positions.
    Growth is geometric so a long generation copies the buffer O(log n) times.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.offset = 0

    def update_and_fetch(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        need = self.offset + T
        if self.keys is None or need > self.keys.shape[2]:
            cap = 0 if self.keys is None else self.keys.shape[2]
            new_cap = max(need, cap + cap // 2)
            new_cap = -(-new_cap // self.step) * self.step
            B, H, _, D = k.shape
            keys = k.new_empty(B, H, new_cap, D)
            values = v.new_empty(B, H, new_cap, v.shape[3])
            if self.keys is not None and self.offset:
                keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
                values[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = keys, values
        self.keys[:, :, self.offset : need] = k
        self.values[:, :, self.offset : need] = v
        self.offset = need
        return self.keys[:, :, :need], self.values[:, :, :need]

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped."""
        n = min(max(n, 0), self.offset)
        self.offset -= n
        return n

    def reset(self) -> None:
        self.offset = 0

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


def make_cache(model: nn.Module | ModelConfig) -> list[KVCache]:
    """A fresh cache list for ``model`` (or its config): one KVCache per layer."""
    config = model if isinstance(model, ModelConfig) else model.config
    return [KVCache() for _ in range(config.num_hidden_layers)]
