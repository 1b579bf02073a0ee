"""Model files, chosen by ``model_type``, and building a model from a stream of named tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError
from qwenlm.models.qwen2 import Qwen2ForCausalLM
from qwenlm.models.qwen2_moe import Qwen2MoeForCausalLM

# Tensors a checkpoint may carry that the model computes instead of loading: rotary
# frequencies, which old Hugging Face checkpoints saved with every attention layer.
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "qwen2": Qwen2ForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    # Qwen3 differs only in what the config switches (q/k norms, no bias, no shared expert).
    "qwen3": Qwen2ForCausalLM,
    "qwen3_moe": Qwen2MoeForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[config.model_type]
    except KeyError:
        raise CheckpointError(f"no model file for model_type {config.model_type!r}") from None


def cuda_graph_safe(config: ModelConfig) -> bool:
    """Whether a one-token decode step has fixed shapes and no host round trips, as replaying
    it from a CUDA graph needs: not with experts (tokens per expert vary) or with windows and
    dual chunks (which check the context length)."""
    windows = any(config.window_of_layer(i) for i in range(config.num_hidden_layers))
    return not (config.is_moe or windows or config.dual_chunk_attention_config)


def swap_module(model: nn.Module, name: str, new: nn.Module | nn.Parameter) -> None:
    """Put ``new`` (a module, or a parameter) at the dotted ``name`` of ``model``, in place.

    The one way transforms (quantization, LoRA, merging) and loaders replace parts of a built
    model; ``name`` is as ``named_modules()`` / ``named_parameters()`` spell it.
    """
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)  # get_submodule("") is the model itself


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build the model on the meta device, then fill it from ``(name, tensor)`` pairs.

    Tensors are placed as they arrive, so peak memory is the model plus one tensor. Every
    parameter must be supplied with its exact shape, except an output head tied to the embedding
    (``tie_word_embeddings``); a tensor the model does not have is refused, except those in
    :data:`IGNORED_TENSOR_SUFFIXES`.
    """
    with torch.device("meta"):
        model = model_class(config)(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    unknown: list[str] = []
    for name, tensor in tensors:
        if name not in params:
            if not name.endswith(IGNORED_TENSOR_SUFFIXES):
                unknown.append(name)
            continue
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"checkpoint tensor {name} has shape {list(tensor.shape)}, but the config "
                f"implies {list(expected)}",
                hint="the checkpoint and its config.json / metadata disagree",
            )
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        swap_module(model, name, nn.Parameter(value, requires_grad=False))
        loaded.add(name)
    if unknown:
        raise CheckpointError(
            f"checkpoint has {len(unknown)} tensor(s) this model does not use: {_some(unknown)}",
            hint="the checkpoint may be for another architecture, or its config disagrees",
        )
    missing = [n for n in params if n not in loaded]
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        # Small Qwen2 models tie the output head to the embedding and store it once.
        model.lm_head.weight = model.model.embed_tokens.weight
        missing.remove("lm_head.weight")
    if missing == ["lm_head.weight"]:
        raise CheckpointError(
            "checkpoint has no lm_head.weight, and its config says tie_word_embeddings: false",
            hint="set tie_word_embeddings to true if the head shares the embedding table; "
            "otherwise the file is incomplete",
        )
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s): {_some(missing)}",
            hint="the file may be incomplete or for a different architecture",
        )
    return model.eval()


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
