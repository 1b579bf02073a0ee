"""Key/value caches: the plain one for direct use of the model, and the engine's per-sequence one.

Both are read by attention through the one cache protocol,
:class:`~qwenlm.models.attention.LayerCache`: the plain :class:`KVCache` is itself a layer
cache; a :class:`SequenceCache` holds every layer of one sequence and is attended through the
engine's ragged-batch views (``engine.BatchLayer``).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.models.attention import AttentionPlan

if TYPE_CHECKING:
    from qwenlm.lora import Adapter


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
        self.ntk_alpha: float | None = None

    def update_and_fetch(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, kv_heads, T, head_dim); returns every stored position."""
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

    def attend(
        self,
        q: torch.Tensor | tuple[torch.Tensor, ...],
        k: torch.Tensor,
        v: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        keys, values = self.update_and_fetch(k, v)
        return plan.attend(q, keys, values)

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped."""
        n = min(max(n, 0), self.offset)
        self.offset -= n
        return n

    def reset(self) -> None:
        self.offset = 0
        self.ntk_alpha = None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


def make_cache(model: nn.Module | ModelConfig) -> list[KVCache]:
    """A fresh cache list for ``model`` (or its config): one KVCache per layer."""
    config = model if isinstance(model, ModelConfig) else model.config
    return [KVCache() for _ in range(config.num_hidden_layers)]


class SequenceCache:
    """Keys and values of one sequence for every layer: (kv_heads, capacity, head_dim) buffers.

    With ``quantized=True`` each stored row (one head, one position) is int8 codes plus a
    float scale (``key_scales``, ``value_scales``: (kv_heads, capacity)), a quarter of the
    float32 memory. A ``dtype`` narrower than ``compute_dtype`` (float16 rows for float32
    attention) is stored rounded to nearest and read back widened. Capacity grows
    geometrically in steps of ``step`` positions.
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
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.shape = (n_kv_heads, 0, head_dim)
        self.quantized = quantized
        self.dtype = torch.int8 if quantized else dtype
        self.compute_dtype = compute_dtype or self.dtype
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

    @property
    def kv_type(self) -> int:
        """The native kernels' code for the stored rows: 0 float32, 1 int8 with a scale
        each, 2 float16 (cpu_kernels.c's KV_F32, KV_I8, KV_F16)."""
        return 1 if self.quantized else 2 if self.dtype == torch.float16 else 0

    def buffers(self) -> tuple[list[torch.Tensor], ...]:
        return (self.keys, self.values, self.key_scales, self.value_scales)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions in total."""
        if n <= self.capacity:
            return
        cap = max(n, self.capacity + self.capacity // 2)
        cap = -(-cap // self.step) * self.step
        for buffers in self.buffers():
            for i, old in enumerate(buffers):
                shape = (old.shape[0], cap, *old.shape[2:])
                # Off the CPU a recorded decode step (cuda_graphs) attends over the whole
                # capacity under a mask, and a masked position still multiplies its value by
                # a zero weight: leftover NaN bits in unwritten memory made whole replies of
                # garbage, now and then. The CPU reads written positions only.
                new = old.new_empty(shape) if old.device.type == "cpu" else old.new_zeros(shape)
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
            if self.dtype != self.compute_dtype:
                return K.to(self.compute_dtype), V.to(self.compute_dtype)
            return K, V
        return (
            K.float() * self.key_scales[layer][:, :n, None],
            V.float() * self.value_scales[layer][:, :n, None],
        )

    def copy_from(self, other: SequenceCache, n: int) -> None:
        """The first ``n`` positions of ``other`` (same shapes), e.g. to fork a sequence."""
        self.reserve(n)
        for mine, theirs in zip(self.buffers(), other.buffers(), strict=True):
            for dst, src in zip(mine, theirs, strict=True):
                dst[:, :n] = src[:, :n]
        self.length = n

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for group in self.buffers() for t in group)


class SequenceState:
    """A sequence being generated: the token ids whose keys and values sit in its cache.

    ``exact`` counts the leading positions whose keys and values are bit for bit what a fresh
    prefill of the same tokens computes (whole prefill chunks at fixed boundaries); the prefix
    cache reuses only those, so a cached prefix never changes a result. ``ntk_alpha`` is
    dynamic NTK's factor, fixed at the sequence's first prefill (None: not used). ``adapter``
    is the per-request LoRA adapter its keys and values were computed with (None: the base).
    """

    def __init__(self, cache: SequenceCache) -> None:
        self.cache = cache
        self.tokens: list[int] = []
        self.exact = 0
        self.ntk_alpha: float | None = None
        self.adapter: Adapter | None = None  # the LoRA adapter its rows run with (per request)

    def __len__(self) -> int:
        return len(self.tokens)

    def trim(self, n: int) -> None:
        """Forget the last ``n`` tokens (rejected drafts, a diverging prompt)."""
        n = min(max(n, 0), len(self.tokens))
        if n:
            del self.tokens[len(self.tokens) - n :]
            self.cache.length = len(self.tokens)
            self.exact = min(self.exact, len(self.tokens))

    def reuse(self, prompt: Seq[int], *, exact: bool = False, chunk: int = 1) -> int:
        """Keep the longest cached prefix of ``prompt`` (at least one token stays to run);
        returns its length. ``exact`` keeps only whole prefill chunks of ``chunk`` tokens that
        a fresh prefill would compute the same way."""
        n, limit = 0, min(len(self.tokens), len(prompt) - 1)
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        if exact:
            n = min(n, self.exact) // chunk * chunk
        self.trim(len(self.tokens) - n)
        return n

    def reset(self) -> None:
        self.trim(len(self.tokens))
        self.ntk_alpha = None
