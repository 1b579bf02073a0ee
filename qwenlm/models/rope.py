"""Rotary position embeddings for long contexts: YaRN, linear, Qwen1's dynamic NTK, LogN.

Every variant only changes the inverse frequencies (and, for YaRN, a factor on cos/sin), so
attention code is the same for all of them. Selected by the config: ``rope_scaling`` (the
Hugging Face block: ``{"type": "yarn", "factor": 4.0, "original_max_position_embeddings":
32768}``) or Qwen1's ``use_dynamic_ntk`` / ``use_logn_attn`` with ``seq_length``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError

ROPE_TYPES = ("default", "yarn", "linear")


def rope_type(config: ModelConfig) -> str:
    s = config.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(
            f"config: unsupported rope_scaling type {kind!r}",
            hint=f"qwenlm implements {', '.join(ROPE_TYPES)}",
        )
    return kind


def default_inv_freq(
    dim: int, base: float | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device)
    return 1.0 / (base ** (exponent.float() / dim))


def yarn_inv_freq(
    dim: int,
    base: float,
    scaling: Mapping[str, Any],
    max_positions: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp between.

    Returns (inv_freq, attention_factor); the factor multiplies cos and sin, which scales every
    attention logit by its square (the paper's "mscale" temperature).
    """
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings") or max_positions)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.arange(dim // 2, dtype=torch.float32, device=device)
    ramp = ((ramp - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: divide it by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention_factor)


def ntk_alpha(length: int, seq_length: int) -> float:
    """Qwen1's dynamic NTK factor: 1 up to the training length, then 2^ceil(log2(n/L) + 1) - 1.

    2x the training length gives 3, 4x gives 7, 8x gives 15.
    """
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_base(base: float, alpha: float, dim: int) -> float:
    """The RoPE base that dynamic NTK uses for ``alpha``: base * alpha^(d / (d - 2))."""
    return base * alpha ** (dim / (dim - 2))


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen1's LogN factor on the query at each 0-based position: log_L(p + 1) beyond L, else 1."""
    n = positions.double() + 1
    scale = torch.log(n) / math.log(seq_length)
    return torch.where(n > seq_length, scale, torch.ones_like(scale)).float()


class ScaledRotaryEmbedding(nn.Module):
    """Rotary embedding (half-split layout) with YaRN, linear or dynamic-NTK frequencies.

    Dynamic NTK (Qwen1) takes its factor per sequence from the caller, who fixes it at prefill
    from the prompt's length as Qwen1 does (without one, from the longest position of each
    row); it is off in training mode, as in Qwen1. Everything is
    computed on the positions' device, so a decode step makes no host round trip (and can be
    recorded in a CUDA graph).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.kind = rope_type(config)
        self.dynamic_ntk = bool(config.use_dynamic_ntk)
        self.seq_length = config.seq_length or config.max_position_embeddings
        self.scaling = dict(config.rope_scaling or {})
        self.max_positions = config.max_position_embeddings
        if self.kind in ("yarn", "linear") and "factor" not in self.scaling:
            raise CheckpointError(f"config: rope_scaling type {self.kind!r} needs a 'factor'")

    def inv_freq(
        self, positions: torch.Tensor, ntk_alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """(inv_freq, attention factor): inv_freq is (D/2,), or (B, T, D/2) under dynamic NTK."""
        device = positions.device
        if self.kind == "yarn":
            return yarn_inv_freq(self.dim, self.base, self.scaling, self.max_positions, device)
        base: float | torch.Tensor = self.base
        if self.dynamic_ntk and not self.training and positions.numel():
            if ntk_alpha is None:
                # No sequence state: the call is the whole prompt, as at Qwen1's prefill.
                ntk_alpha = ntk_alpha_of_length(
                    positions.amax(-1, keepdim=True) + 1, self.seq_length
                )
            alpha = ntk_alpha.double().expand(positions.shape)[..., None]  # (B, T, 1)
            base = (self.base * alpha ** (self.dim / (self.dim - 2))).float()
        inv_freq = default_inv_freq(self.dim, base, device)
        if self.kind == "linear":
            inv_freq = inv_freq / float(self.scaling["factor"])
        return inv_freq, 1.0

    def forward(
        self, positions: torch.Tensor, ntk_alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, D) for ``positions`` (B, T); ``ntk_alpha`` (B, T) or (B, 1) fixes
        dynamic NTK's factor per token (else it follows the longest position of each row)."""
        inv_freq, attention_factor = self.inv_freq(positions, ntk_alpha)
        freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        if attention_factor == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * attention_factor, emb.sin() * attention_factor


def ntk_alpha_of_length(length: torch.Tensor, seq_length: int) -> torch.Tensor:
    """:func:`ntk_alpha` as tensor operations (no host round trip)."""
    n = length.double()
    return (2 ** torch.ceil(torch.log2(n / seq_length) + 1) - 1).clamp(min=1)


def needs_scaled_rotary(config: ModelConfig) -> bool:
    return rope_type(config) != "default" or bool(config.use_dynamic_ntk)
