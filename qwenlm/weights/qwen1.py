"""Qwen1 (Qwen-1.8B / 7B / 14B / 72B) checkpoints, mapped onto the Qwen2 names and config.

Qwen1 is the Qwen2 architecture with as many key/value heads as query heads: its fused
``attn.c_attn`` (Q, K and V rows, with bias) splits into ``q_proj``/``k_proj``/``v_proj``,
``attn.c_proj`` is ``o_proj``, and its MLP computes ``c_proj(w1(x) * silu(w2(x)))``, so ``w2``
is the gate and ``w1`` the up projection. Its config names differ too (``kv_channels``,
``rotary_emb_base``, ``layer_norm_epsilon``, an ``intermediate_size`` twice the MLP width) and it
has its own long-context switches (``use_dynamic_ntk``, ``use_logn_attn``, ``seq_length``),
which the model reads from :class:`~qwenlm.config.ModelConfig`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError

# Qwen1's chat generation defaults (Qwen-7B-Chat's generation_config.json); chat stops at
# <|im_end|>, <|im_start|> or <|endoftext|>.
GENERATION_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 0.8,
    "top_k": 0,
    "repetition_penalty": 1.1,
    "max_new_tokens": 512,
}

_GLOBAL = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_QKV = ("q_proj", "k_proj", "v_proj")


def is_qwen1(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("model_type") == "qwen" or "QWenLMHeadModel" in (cfg.get("architectures") or ())


def qwen1_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """The Qwen2-form config of a Qwen1 config.json."""
    if float(cfg.get("rotary_pct", 1.0)) != 1.0:
        raise CheckpointError(
            f"config: rotary_pct {cfg['rotary_pct']} is not supported (Qwen1 models use 1.0)"
        )
    if not cfg.get("no_bias", True):
        raise CheckpointError("config: Qwen1 with no_bias=false is not supported")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        hf: dict[str, Any] = {
            "model_type": "qwen2",
            "vocab_size": int(cfg["vocab_size"]),
            "hidden_size": hidden,
            # Qwen1 states the width of w1 and w2 together.
            "intermediate_size": int(cfg["intermediate_size"]) // 2,
            "num_hidden_layers": int(cfg["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": int(cfg.get("max_position_embeddings", 8192)),
            "rope_theta": float(cfg.get("rotary_emb_base", 10000.0)),
            "rms_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-6)),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "bos_token_id": cfg.get("bos_token_id", 151643),
            "eos_token_id": cfg.get("eos_token_id", 151643),
            "use_dynamic_ntk": bool(cfg.get("use_dynamic_ntk", False)),
            "use_logn_attn": bool(cfg.get("use_logn_attn", False)),
            "seq_length": int(cfg.get("seq_length", 2048)),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Qwen1 config.json: bad or missing {e}") from None
    kv_channels = int(cfg.get("kv_channels", hidden // heads))
    if kv_channels * heads != hidden or hidden % heads:
        hf["head_dim"] = kv_channels
    return ModelConfig.from_hf(hf)


def hf_names(name: str) -> list[str]:
    """The Qwen2 names that Qwen1 tensor ``name`` holds (three for c_attn, none if unused)."""
    if name in _GLOBAL:
        return [_GLOBAL[name]]
    m = _LAYER_RE.fullmatch(name)
    if m is None:
        return []
    i, rest = m.groups()
    prefix = f"model.layers.{i}."
    if rest in _LAYER:
        return [prefix + _LAYER[rest]]
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        kind = rest.rsplit(".", 1)[1]
        return [f"{prefix}self_attn.{p}.{kind}" for p in _QKV]
    return []  # e.g. rotary inv_freq buffers


def map_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen1 (name, tensor) pairs as Qwen2 pairs; c_attn splits into Q, K and V."""
    for name, t in tensors:
        names = hf_names(name)
        if len(names) == 3:
            yield from zip(names, t.chunk(3, dim=0), strict=True)
        elif names:
            yield names[0], t


def map_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, shape in shapes.items():
        names = hf_names(name)
        for hf in names:
            out[hf] = (shape[0] // len(names), *shape[1:])
    return out


def qwen1_name(hf: str) -> tuple[str, int]:
    """The Qwen1 tensor holding Qwen2 tensor ``hf`` and which third of its rows (0 if whole)."""
    for q1, q2 in _GLOBAL.items():
        if q2 == hf:
            return q1, -1
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m is not None:
        i, rest = m.groups()
        for q1, q2 in _LAYER.items():
            if q2 == rest:
                return f"transformer.h.{i}.{q1}", -1
        m2 = re.fullmatch(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", rest)
        if m2 is not None:
            return f"transformer.h.{i}.attn.c_attn.{m2.group(2)}", _QKV.index(m2.group(1))
    raise CheckpointError(f"tensor {hf} has no counterpart in a Qwen1 checkpoint")


def read_mapped(
    read: Callable[[str, tuple[int, int] | None], torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    hf: str,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Read Qwen2 tensor ``hf`` (optionally rows start..stop) from a Qwen1 checkpoint."""
    name, third = qwen1_name(hf)
    if third < 0:
        return read(name, rows)
    n = shapes[name][0] // 3
    start, stop = rows if rows is not None else (0, n)
    return read(name, (third * n + start, third * n + stop))
