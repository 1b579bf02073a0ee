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

# model_type values whose checkpoints the dense Qwen2 model file can run.
DENSE_MODEL_TYPES = ("qwen2",)
# Every model_type with a model file (Qwen1's "qwen" is mapped onto "qwen2" by weights/qwen1.py).
MODEL_TYPES = ("qwen2", "qwen2_moe")
# Hugging Face's defaults for Qwen2-MoE keys that a config.json may leave out.
MOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "decoder_sparse_step": 1,
    "mlp_only_layers": (),
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
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
    # Qwen2-MoE (None for dense models).
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
        return self.model_type == "qwen2_moe"

    def is_sparse_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` runs experts (Hugging Face's rule for Qwen2-MoE)."""
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
        if model_type == "qwen2_moe":
            for key, value in MOE_DEFAULTS.items():
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
        """Build from GGUF metadata (``{arch}.block_count`` and friends)."""
        arch = metadata.get("general.architecture")
        if arch not in DENSE_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported GGUF architecture {arch!r}",
                hint=f"this version of qwenlm runs {', '.join(DENSE_MODEL_TYPES)} models",
            )

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise CheckpointError(f"GGUF metadata is missing {arch}.{key}")
            return value

        n_heads = int(get("attention.head_count"))
        tokens = metadata.get("tokenizer.ggml.tokens")
        if vocab_size is None:
            vocab_size = len(tokens) if tokens is not None else None
        if vocab_size is None:
            raise CheckpointError("GGUF has neither a vocabulary nor an embedding table size")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        return cls(
            vocab_size=int(vocab_size),
            hidden_size=int(get("embedding_length")),
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
            max_position_embeddings=int(get("context_length")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            model_type=arch,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_id=int(eos) if eos is not None else None,
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json form (the inverse of :meth:`from_hf`)."""
        arch = "Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"
        out: dict[str, Any] = {"architectures": [arch]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.metadata.get("hf_key", f.name)] = (
                list(value) if isinstance(value, tuple) else value
            )
        out["num_key_value_heads"] = self.num_key_value_heads
        return out
