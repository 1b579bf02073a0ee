"""Upcycling a dense Qwen2 checkpoint into a Qwen2-MoE one, as the Qwen2 report describes.

For experts of width ``h_E``, ``n`` of them, and a dense FFN of width ``h_FFN``:

1. the FFN is copied ``ceil(n * h_E / h_FFN)`` times;
2. each copy's intermediate units are shuffled (one permutation per copy, applied to the rows
   of ``gate_proj`` and ``up_proj`` and the columns of ``down_proj`` alike, so each copy still
   computes the dense FFN);
3. the copies are laid end to end and cut into ``n`` experts of ``h_E`` units;
4. in each expert a fraction (50% by default) of the parameters, chosen at random, is drawn
   afresh from a normal distribution with the dense matrix's standard deviation.

The shared expert is cut the same way from further shuffled copies (never re-initialised), its
sigmoid gate starts at zero (a factor of one half), and the router starts small and random, so
routing starts near uniform. Everything is seeded; attention, norms and embeddings are copied.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError

_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")


@dataclass(frozen=True)
class UpcycleSpec:
    """What MoE to make. Sizes default to a quarter of the dense FFN for each expert."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # default: h_FFN // 4
    shared_expert_intermediate_size: int | None = None  # default: h_FFN
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = False
    reinit_fraction: float = 0.5
    shuffle: bool = True
    router_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.reinit_fraction <= 1.0:
            raise CheckpointError(
                f"upcycle: reinit_fraction must be in [0, 1], got {self.reinit_fraction}"
            )
        if self.num_experts < 1 or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(
                f"upcycle: need 1 <= experts per token ({self.num_experts_per_tok}) <= "
                f"experts ({self.num_experts})"
            )


def ffn_copies(num_experts: int, expert_size: int, ffn_size: int) -> int:
    """How many copies of the dense FFN the experts are cut from: ceil(n * h_E / h_FFN)."""
    return math.ceil(num_experts * expert_size / ffn_size)


def moe_config(dense: ModelConfig, spec: UpcycleSpec) -> ModelConfig:
    if dense.is_moe:
        raise CheckpointError("upcycle: the model is a mixture of experts already")
    if dense.qk_norm:
        # The result is Qwen2-MoE, whose attention has no q/k norms to carry Qwen3's over.
        raise CheckpointError("upcycle: Qwen3 models are not supported, only Qwen2 / Qwen2.5")
    h = dense.intermediate_size
    return dataclasses.replace(
        dense,
        model_type="qwen2_moe",
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        moe_intermediate_size=spec.moe_intermediate_size or max(h // 4, 1),
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size or h,
        decoder_sparse_step=spec.decoder_sparse_step,
        mlp_only_layers=tuple(spec.mlp_only_layers),
        norm_topk_prob=spec.norm_topk_prob,
        router_aux_loss_coef=0.001,
    )


def _shuffled_copies(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    copies: int,
    shuffle: bool,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``copies`` permuted copies of the FFN laid end to end along the intermediate dimension."""
    h = gate.shape[0]
    perms = [torch.randperm(h, generator=g) if shuffle else torch.arange(h) for _ in range(copies)]
    idx = torch.cat(perms)  # (copies * h,) unit of the dense FFN behind each concatenated unit
    return gate[idx], up[idx], down[:, idx]


def _reinit(w: torch.Tensor, fraction: float, std: float, g: torch.Generator) -> torch.Tensor:
    if fraction == 0:
        return w
    mask = torch.rand(w.shape, generator=g) < fraction
    return torch.where(mask, std * torch.randn(w.shape, generator=g), w)


def upcycle_ffn(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    config: ModelConfig,
    spec: UpcycleSpec,
    g: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One dense FFN (gate/up: (h_FFN, d), down: (d, h_FFN)) as a sparse MoE block's tensors."""
    n, hE = config.num_experts, config.moe_intermediate_size
    gate, up, down = gate.float(), up.float(), down.float()
    G, U, D = _shuffled_copies(gate, up, down, ffn_copies(n, hE, gate.shape[0]), spec.shuffle, g)
    std = {
        "gate_proj": gate.std().item(),
        "up_proj": up.std().item(),
        "down_proj": down.std().item(),
    }
    out: dict[str, torch.Tensor] = {}
    for e in range(n):
        s = slice(e * hE, (e + 1) * hE)
        parts = {"gate_proj": G[s], "up_proj": U[s], "down_proj": D[:, s]}
        for name, w in parts.items():
            out[f"experts.{e}.{name}.weight"] = _reinit(
                w, spec.reinit_fraction, std[name], g
            ).contiguous()
    hS = config.shared_expert_intermediate_size
    G, U, D = _shuffled_copies(gate, up, down, math.ceil(hS / gate.shape[0]), spec.shuffle, g)
    out["shared_expert.gate_proj.weight"] = G[:hS].contiguous()
    out["shared_expert.up_proj.weight"] = U[:hS].contiguous()
    out["shared_expert.down_proj.weight"] = D[:, :hS].contiguous()
    out["shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size)
    out["gate.weight"] = spec.router_std * torch.randn(n, config.hidden_size, generator=g)
    return out


def upcycle_tensors(
    dense: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], spec: UpcycleSpec
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The MoE config and its (name, tensor) stream, converted from a dense stream as it goes."""
    config = moe_config(dense, spec)
    g = torch.Generator().manual_seed(spec.seed)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors:
            m = _MLP.fullmatch(name)
            if m is None or not config.is_sparse_layer(int(m.group(1))):
                yield name, t
                continue
            i = int(m.group(1))
            parts = pending.setdefault(i, {})
            parts[m.group(2)] = t
            if len(parts) == 3:
                del pending[i]
                block = upcycle_ffn(
                    parts["gate_proj"], parts["up_proj"], parts["down_proj"], config, spec, g
                )
                for key, value in block.items():
                    yield f"model.layers.{i}.mlp.{key}", value
        if pending:
            raise CheckpointError(f"upcycle: layer {min(pending)} has an incomplete FFN")

    return config, stream()
