"""Model configuration: a frozen dataclass whose field names are Hugging Face's config.json keys."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenlm.errors import CheckpointError

# Every model_type with a model file (Qwen1's "qwen" is mapped onto "qwen2" by weights/qwen1.py).
# Qwen3 is Qwen2's layout with RMSNorm on each head's queries and keys: the same model files.
MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
# GGUF architectures (llama.cpp's names) that from_gguf reads, and the model_type of each.
GGUF_ARCHITECTURES = {
    "qwen": "qwen2",  # Qwen1: fused QKV, split by weights/gguf.py
    "qwen2": "qwen2",
    "qwen2moe": "qwen2_moe",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
}
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")
# Hugging Face's defaults (its configuration classes) for keys that a config.json may leave out.
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "decoder_sparse_step": 1,
        "mlp_only_layers": (),
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001,
    },
    "qwen3": {"head_dim_override": 128, "attention_bias": False},
    "qwen3_moe": {
        "attention_bias": False,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "decoder_sparse_step": 1,
        "mlp_only_layers": (),
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001,
    },
}
_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Qwen model.

    Field names follow the Hugging Face ``config.json`` so a config loads with no mapping table;
    values derived from them are properties. Build with :meth:`from_hf` or :meth:`from_gguf` and
    change with :func:`dataclasses.replace`, never by mutation.
    """

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    model_type: str = "qwen2"
    # Explicit head_dim exists in some configs; None means hidden_size // num_attention_heads.
    head_dim_override: int | None = field(default=None, metadata={"hf_key": "head_dim"})
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    rope_scaling: Mapping[str, Any] | None = None
    # Qwen3's switch for a bias on Q, K, V and O (false in its releases); None is Qwen2's fixed
    # layout: a bias on Q, K and V only.
    attention_bias: bool | None = None
    # Qwen2-MoE and Qwen3-MoE (None for dense models; Qwen3-MoE has no shared expert).
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    decoder_sparse_step: int | None = None
    mlp_only_layers: tuple[int, ...] | None = None
    norm_topk_prob: bool | None = None
    router_aux_loss_coef: float | None = None
    # Long context, each off unless the config turns it on (see models/rope.py, attention.py).
    use_sliding_window: bool | None = None
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: tuple[str, ...] | None = None
    dual_chunk_attention_config: Mapping[str, Any] | None = None
    # Qwen1: dynamic NTK-aware RoPE and LogN attention scaling relative to seq_length.
    use_dynamic_ntk: bool | None = None
    use_logn_attn: bool | None = None
    seq_length: int | None = None

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_MODEL_TYPES

    @property
    def qk_norm(self) -> bool:
        """Whether attention normalises each head's queries and keys (Qwen3)."""
        return self.model_type in QK_NORM_MODEL_TYPES

    def is_sparse_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` runs experts (Hugging Face's rule for Qwen2/3-MoE)."""
        if not self.is_moe or not self.num_experts or i in (self.mlp_only_layers or ()):
            return False
        return (i + 1) % (self.decoder_sparse_step or 1) == 0

    def window_of_layer(self, i: int) -> int | None:
        """The sliding attention window of decoder layer ``i``, or None for full attention."""
        if not self.use_sliding_window or not self.sliding_window:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        # Qwen2's rule: the layers from max_window_layers on use the window.
        first = self.max_window_layers if self.max_window_layers is not None else 28
        return self.sliding_window if i >= first else None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise CheckpointError for values no model can be built from."""
        ints = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in ints.items():
            # Bounded so that a corrupt config fails here instead of in a huge allocation.
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 24:
                raise CheckpointError(f"config: {name} must be a positive integer, got {value!r}")
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        for name, value in (("rope_theta", self.rope_theta), ("rms_norm_eps", self.rms_norm_eps)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise CheckpointError(f"config: {name} must be a positive number, got {value!r}")
        if self.is_moe:
            self._validate_experts()
        dca = self.dual_chunk_attention_config
        if dca is not None:
            chunk, local = dca.get("chunk_size"), dca.get("local_size", 0)
            if not isinstance(chunk, int) or not isinstance(local, int) or not 0 <= local < chunk:
                raise CheckpointError(
                    "config: dual_chunk_attention_config needs integers 0 <= local_size < "
                    f"chunk_size, got {dict(dca)}"
                )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(
                f"config: layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(
                f"config: unsupported hidden_act {self.hidden_act!r} (Qwen uses 'silu')"
            )

    def _validate_experts(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise CheckpointError(
                f"config: num_experts_per_tok {self.num_experts_per_tok} exceeds "
                f"num_experts {self.num_experts}"
            )

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a parsed Hugging Face config.json; unknown keys are ignored."""
        if not isinstance(cfg, Mapping):
            raise CheckpointError("config.json must hold a JSON object")
        model_type = cfg.get("model_type", "qwen2")
        if model_type not in MODEL_TYPES:
            hint = f"this version of qwenlm runs {', '.join(MODEL_TYPES)} checkpoints"
            if model_type == "qwen":
                hint = "open Qwen1 folders with qwenlm.weights.open_checkpoint"
            raise CheckpointError(f"unsupported model_type {model_type!r}", hint=hint)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.metadata.get("hf_key", f.name)
            if key in cfg and cfg[key] is not None:
                kwargs[f.name] = cfg[key]
        # transformers 5 moved rope_theta into rope_parameters.
        rope_params = cfg.get("rope_parameters")
        if (
            "rope_theta" not in kwargs
            and isinstance(rope_params, Mapping)
            and "rope_theta" in rope_params
        ):
            kwargs["rope_theta"] = rope_params["rope_theta"]
        # transformers 5 writes rope scaling (YaRN...) into rope_parameters too.
        if (
            "rope_scaling" not in kwargs
            and isinstance(rope_params, Mapping)
            and rope_params.get("rope_type", "default") != "default"
        ):
            kwargs["rope_scaling"] = dict(rope_params)
        if model_type == "qwen3_moe":
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
            if "num_experts" not in kwargs and cfg.get("num_local_experts") is not None:
                kwargs["num_experts"] = cfg["num_local_experts"]
            # Qwen3-MoE has no shared expert, whatever stray key a config carries.
            kwargs.pop("shared_expert_intermediate_size", None)
        for key, value in TYPE_DEFAULTS.get(model_type, {}).items():
            kwargs.setdefault(key, value)
        for key in ("eos_token_id", "mlp_only_layers", "layer_types"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads", 14))
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise CheckpointError(f"config.json: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        try:
            cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        return cls.from_hf(cfg)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], vocab_size: int | None = None) -> ModelConfig:
        """Build from GGUF metadata (``{arch}.block_count`` and friends), as llama.cpp reads it."""
        arch = metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported GGUF architecture {arch!r}",
                hint=f"this version of qwenlm runs {', '.join(GGUF_ARCHITECTURES)} models",
            )

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise CheckpointError(f"GGUF metadata is missing {arch}.{key}")
            return value

        tokens = metadata.get("tokenizer.ggml.tokens")
        if vocab_size is None:
            vocab_size = len(tokens) if tokens is not None else None
        if vocab_size is None:
            raise CheckpointError("GGUF has neither a vocabulary nor an embedding table size")
        hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        ff = int(get("feed_forward_length"))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        if int(get("attention.value_length", head_dim)) != head_dim:
            raise CheckpointError(f"GGUF: {arch}.attention.value_length differs from key_length")
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise CheckpointError(
                f"GGUF: {arch}.rope.dimension_count is not the head size {head_dim}",
                hint="partial rotary embeddings are not supported",
            )
        model_type = GGUF_ARCHITECTURES[arch]
        hf: dict[str, Any] = {
            "model_type": model_type,
            "vocab_size": int(vocab_size),
            "hidden_size": hidden,
            # Qwen1 states the width of its two up projections together.
            "intermediate_size": ff // 2 if arch == "qwen" else ff,
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
            "max_position_embeddings": int(get("context_length")),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
            "rope_scaling": _gguf_rope_scaling(arch, metadata),
        }
        if head_dim != hidden // n_heads or model_type in QK_NORM_MODEL_TYPES:
            hf["head_dim"] = head_dim  # Qwen3's default (128) is not hidden / heads
        for key in ("bos_token_id", "eos_token_id"):
            value = metadata.get(f"tokenizer.ggml.{key}")
            hf[key] = int(value) if value is not None else None
        if model_type in MOE_MODEL_TYPES:
            hf.update(_gguf_moe(arch, get, ff))
        return cls.from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """The config.json form (the inverse of :meth:`from_hf`)."""
        out: dict[str, Any] = {"architectures": [_ARCHITECTURES[self.model_type]]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.metadata.get("hf_key", f.name)] = (
                list(value) if isinstance(value, tuple) else value
            )
        out["num_key_value_heads"] = self.num_key_value_heads
        return out


def _gguf_moe(arch: str, get: Any, ff: int) -> dict[str, Any]:
    """The MoE keys of a qwen2moe / qwen3moe GGUF, with llama.cpp's defaults."""
    if float(get("expert_weights_scale", 1.0)) not in (0.0, 1.0):
        raise CheckpointError(f"GGUF: {arch}.expert_weights_scale is not supported")
    if int(get("expert_gating_func", 1)) != 1:  # 1: softmax, the only gating Qwen uses
        raise CheckpointError(f"GGUF: {arch}.expert_gating_func other than softmax")
    used = int(get("expert_used_count"))
    out: dict[str, Any] = {
        "num_experts": int(get("expert_count")),
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(get("expert_feed_forward_length", ff // max(used, 1))),
        # llama.cpp runs experts in every layer, and renormalises the chosen experts' weights
        # for Qwen3-MoE (whose releases set norm_topk_prob) but not for Qwen2-MoE.
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": bool(get("expert_weights_norm", arch == "qwen3moe")),
    }
    if arch == "qwen2moe":
        out["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length", ff))
    return out


def _gguf_rope_scaling(arch: str, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{arch}.rope.scaling.*`` as the config.json ``rope_scaling`` block that means the same.

    llama.cpp's YaRN multiplies cos and sin by ``attn_factor * (1 + 0.1 ln factor)``, so a
    stored attn_factor becomes Hugging Face's attention_factor times the same term; the keys
    Hugging Face's YaRN has no counterpart for must hold their neutral values.
    """

    def opt(key: str) -> Any:
        return metadata.get(f"{arch}.rope.scaling.{key}")

    kind = opt("type")
    if kind in (None, "none"):
        return None
    factor = opt("factor")
    if kind not in ("yarn", "linear") or factor is None or float(factor) <= 0:
        raise CheckpointError(
            f"GGUF: unsupported rope scaling {kind!r} (factor {factor!r})",
            hint="qwenlm runs yarn and linear rope scaling with a positive factor",
        )
    factor = float(factor)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    neutral = {"yarn_log_multiplier": 0.0, "yarn_attn_factor": 1.0}
    for key, value in neutral.items():
        if opt(key) is not None and float(opt(key)) != value:
            raise CheckpointError(f"GGUF: {arch}.rope.scaling.{key} {opt(key)} is not supported")
    if opt("yarn_ext_factor") is not None and float(opt("yarn_ext_factor")) not in (-1.0, 1.0):
        raise CheckpointError(f"GGUF: {arch}.rope.scaling.yarn_ext_factor is not supported")
    out: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
    if opt("original_context_length") is not None:
        out["original_max_position_embeddings"] = int(opt("original_context_length"))
    for key in ("beta_fast", "beta_slow"):
        if opt(f"yarn_{key}") is not None:
            out[key] = float(opt(f"yarn_{key}"))
    attn_factor = opt("attn_factor")
    if attn_factor is not None and float(attn_factor) != 1.0:
        out["attention_factor"] = float(attn_factor) * (0.1 * math.log(factor) + 1.0)
    return out
