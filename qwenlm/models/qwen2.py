"""Qwen2 / Qwen2.5 / Qwen3 dense decoder: GQA with Q/K/V bias, RoPE, RMSNorm, SwiGLU.

Qwen3 is the same layout without the Q/K/V bias and with RMSNorm on each head's queries and
keys before the rotation (``self_attn.q_norm`` / ``k_norm``, from ``config.qk_norm``).

Module and parameter names reproduce the Hugging Face checkpoint (``model.layers.N.self_attn.
q_proj``...), so a state dict loads with no mapping table. The KV cache is passed in: a list with
one object per layer implementing :class:`~qwenlm.models.attention.LayerCache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.models.attention import (
    NO_CACHE,
    AttentionPlan,
    LayerCache,
    SequentialCache,
    make_plans,
)
from qwenlm.models.rope import ScaledRotaryEmbedding, needs_scaled_rotary, ntk_alpha


def concat_linears(mods: Sequence[nn.Module]) -> nn.Module:
    """One layer computing the given layers' outputs side by side (their rows concatenated)."""
    if all(type(m) is nn.Linear for m in mods):
        has_bias = any(m.bias is not None for m in mods)
        out = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=has_bias)
        out.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
        if has_bias:
            biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods]
            out.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
        return out
    # Quantized layers know how to concatenate themselves.
    return type(mods[0]).concat(list(mods))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the storage dtype; bf16 loses too much in the mean square.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the half-split ("NeoX") layout that Qwen uses."""

    dynamic_ntk = False  # see rope.ScaledRotaryEmbedding

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    def forward(
        self, positions: torch.Tensor, ntk_alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed in float32 from the positions each call: cheap next to the matmuls, and the
        # values equal the reference implementation's to the last bit.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device)
        inv_freq = 1.0 / (self.base ** (exponent.float() / self.head_dim))
        freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
        return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        # Qwen2 puts a bias on Q, K and V only (attention_bias None); Qwen3's attention_bias
        # switches one on all four projections.
        qkv_bias, o_bias = config.attention_bias is not False, bool(config.attention_bias)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=o_bias)
        # Qwen3 normalises each head's query and key (over head_dim) before the rotation.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def fuse(self) -> None:
        """Compute Q, K and V with one matrix product (inference only)."""
        self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: LayerCache,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(
                [
                    self.n_heads * self.head_dim,
                    self.n_kv_heads * self.head_dim,
                    self.n_kv_heads * self.head_dim,
                ],
                dim=-1,
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, n_heads, T, D); k, v: (B, n_kv_heads, T, D)
        if self.q_norm is not None:  # Qwen3: RMSNorm per head on queries and keys
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = plan.rotate(q, k, cos, sin)
        y = cache.attend(q, k, v, plan)  # stores k, v; attends over everything stored
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        d, h = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def fuse(self) -> None:
        """Compute the gate and up projections with one matrix product (inference only)."""
        self.gate_up_proj = concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: LayerCache,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.make_layer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if needs_scaled_rotary(config):
            self.rotary_emb = ScaledRotaryEmbedding(config)  # YaRN, dynamic NTK
        else:
            self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def make_layer(self, config: ModelConfig, i: int) -> nn.Module:
        return DecoderLayer(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Sequence[LayerCache] | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        ntk_alpha: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, hidden) for ``input_ids`` (B, T).

        Without ``positions`` the tokens follow what ``cache`` holds (a
        :class:`~qwenlm.models.attention.SequentialCache`) or start at 0. ``ntk_alpha`` (B, T)
        fixes dynamic NTK's factor per token (caches of one sequence remember theirs).
        """
        B, T = input_ids.shape
        if positions is None:
            offset = cast(SequentialCache, cache[0]).offset if cache is not None else 0
            positions = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        if self.rotary_emb.dynamic_ntk and ntk_alpha is None and cache is not None:
            ntk_alpha = self._fixed_ntk_alpha(cast(Sequence[SequentialCache], cache), positions)
        cos, sin = self.rotary_emb(positions, ntk_alpha)
        plans = make_plans(
            self.config,
            positions,
            lambda p: self.rotary_emb(p, ntk_alpha),
            training=self.training,
            mask=mask,
        )
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        # A transform may give the layers a way to run them all at once (the native decode
        # stack of generation/fastpath.py); it answers None where it does not apply.
        run_all = getattr(self.layers, "run_all", None)
        y = run_all(x, cos, sin, plans, cache) if run_all is not None and cache else None
        if y is not None:
            return self.norm(y)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, plans[i], cache[i] if cache is not None else NO_CACHE)
        return self.norm(x)

    def _fixed_ntk_alpha(
        self, cache: Sequence[SequentialCache], positions: torch.Tensor
    ) -> torch.Tensor:
        """A plain cache keeps the dynamic-NTK factor its first call (the prompt) gave it."""
        if cache[0].ntk_alpha is None:
            alpha = ntk_alpha(int(positions.max()) + 1, self.rotary_emb.seq_length)
            for c in cache:
                c.ntk_alpha = alpha
        return torch.tensor(cache[0].ntk_alpha, device=positions.device).expand(positions.shape)


class Qwen2ForCausalLM(nn.Module):
    """The Qwen2 language model: token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Fuse Q/K/V and gate/up projections for inference: fewer, larger matrix products."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Sequence[LayerCache] | None = None,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        ntk_alpha: torch.Tensor | None = None,
        logits_at: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for ``input_ids`` (B, T).

        ``cache`` holds one object per layer and is extended in place. ``mask`` (boolean,
        broadcastable to (B, heads, T, S), True = attend) replaces the causal mask, for padded
        batches. ``logits_at`` (an index, or a tensor of indices into T) computes logits for
        those positions only (B, len, vocab): the output head is the largest matrix, so
        prefill should not run it for every prompt token.
        """
        h = self.model(input_ids, cache, positions, mask, ntk_alpha=ntk_alpha)
        if logits_at is not None:
            idx = torch.as_tensor(logits_at, device=h.device).reshape(-1)
            h = h[:, idx]
        return self.lm_head(h)
