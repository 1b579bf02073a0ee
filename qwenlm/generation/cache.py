"""KV caches: one object per layer, passed into the model's forward."""

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


class PromptCache:
    """A cache plus the token ids it holds, so a follow-up prompt prefills only what is new.

    A chat turn re-sends the whole conversation; everything up to the first id that differs
    from what is cached is reused.
    """

    def __init__(self, model: nn.Module) -> None:
        self.cache = make_cache(model)
        self.tokens: list[int] = []

    def reuse(self, prompt: list[int]) -> int:
        """Trim the cache to its common prefix with ``prompt``; returns the reused length."""
        n = 0
        limit = min(len(self.tokens), len(prompt) - 1)  # always leave one token to run
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        # Per layer: a forward pass interrupted part-way (Ctrl-C) leaves layers at different offsets.
        for c in self.cache:
            c.trim(c.offset - n)
        self.tokens = self.tokens[:n]
        return n

    def reset(self) -> None:
        for c in self.cache:
            c.reset()
        self.tokens = []
