"""Writing GGUF files that llama.cpp loads: Qwen2 / Qwen2-MoE weights, tokenizer and chat template.

Tensor names come from llama.cpp's own table (``gguf.constants``); the metadata keys are the
ones llama.cpp's ``convert_hf_to_gguf.py`` writes for Qwen2, with the vocabulary in GGUF's
byte-level BPE form (``tokenizer.ggml.model = gpt2``, ``pre = qwen2``). Tensors are streamed:
shapes and types go into the header first, then each tensor is read, converted and written,
so peak memory is one tensor. The file is written under a hidden temporary name in the output
folder, re-opened with qwenlm's bounds-checked reader and checked tensor by tensor, fsynced and
only then renamed onto the output: a failed or interrupted export leaves no partial file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, LlamaFileType, TokenType

from qwenlm.config import ModelConfig
from qwenlm.errors import QwenlmError
from qwenlm.fsutil import atomic_write
from qwenlm.tokenizer import Tokenizer
from qwenlm.weights import gguf as gguf_format
from qwenlm.weights.hf_writer import _bytelevel, bpe_merges

# --type -> (type of the matrices, general.file_type). Norms, biases and routers stay F32.
TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Our model_type -> llama.cpp's architecture.
ARCHITECTURES = {"qwen2": MODEL_ARCH.QWEN2, "qwen2_moe": MODEL_ARCH.QWEN2MOE}

# Hugging Face names -> llama.cpp names: the inverse of the reader's table, plus Qwen2-MoE's
# router, shared expert and stacked experts (``{x}`` is gate, up or down).
_GLOBAL = {hf: name for name, hf in gguf_format._GLOBAL_MAP.items()}
_LAYER = {hf: name for name, hf in gguf_format._LAYER_MAP.items()} | {
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    **{
        f"mlp.shared_expert.{x}_proj.weight": f"ffn_{x}_shexp.weight"
        for x in ("gate", "up", "down")
    },
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_NUMPY_TYPES = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
}
# Routing decides which experts run; llama.cpp's converter keeps routers in F32 too.
_F32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
# llama.cpp's rule for added tokens that "look special": <|...|> and DeepSeek's <｜...｜>.
_CONTROL_RE = re.compile(r"<\|.*\|>|<｜.*｜>")


class ExportError(QwenlmError):
    """A model that cannot be exported, or an output that cannot be written."""


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its llama.cpp name, the Hugging Face tensors it is made of (experts are
    stacked), its shape in torch order and its GGML type."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType


def check_exportable(config: ModelConfig) -> None:
    """Raise ExportError for a model llama.cpp's qwen2 / qwen2moe graphs would run differently."""
    if config.model_type not in ARCHITECTURES:
        raise ExportError(
            f"cannot export model_type {config.model_type!r} to GGUF",
            hint=f"supported: {', '.join(ARCHITECTURES)}",
        )
    unsupported = []
    if any(config.window_of_layer(i) for i in range(config.num_hidden_layers)):
        unsupported.append("sliding-window attention")
    if config.dual_chunk_attention_config:
        unsupported.append("dual chunk attention")
    if config.use_dynamic_ntk or config.use_logn_attn:
        unsupported.append("Qwen1's dynamic NTK / LogN scaling")
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    extra = set(scaling) - {"rope_type", "type", "factor", "original_max_position_embeddings"}
    if kind not in ("default", "yarn", "linear") or extra:
        unsupported.append(f"rope_scaling {scaling}")
    if config.is_moe:
        if any(not config.is_sparse_layer(i) for i in range(config.num_hidden_layers)):
            unsupported.append(
                "dense layers between MoE layers (mlp_only_layers, decoder_sparse_step)"
            )
        if config.norm_topk_prob:
            unsupported.append("norm_topk_prob")
        if not config.shared_expert_intermediate_size:
            unsupported.append("a MoE without a shared expert")
    if unsupported:
        raise ExportError(
            f"cannot export to GGUF: llama.cpp's {ARCHITECTURES[config.model_type].name.lower()} "
            f"architecture has no {', '.join(unsupported)}",
            hint="export a model without these settings",
        )


def _gguf_name(hf: str) -> tuple[str, int]:
    """The llama.cpp name of a Hugging Face tensor, and its expert index (0 for the rest)."""
    if hf in _GLOBAL:
        return _GLOBAL[hf], 0
    m = _LAYER_RE.fullmatch(hf)
    if m and (e := _EXPERT_RE.fullmatch(m.group(2))):
        return f"blk.{m.group(1)}.ffn_{e.group(2)}_exps.weight", int(e.group(1))
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}", 0
    raise ExportError(f"tensor {hf} has no llama.cpp counterpart")


def _tensor_type(
    name: str, shape: tuple[int, ...], matrix_type: GGMLQuantizationType
) -> GGMLQuantizationType:
    if len(shape) == 1 or name.endswith(_F32_TENSORS):
        return GGMLQuantizationType.F32
    if matrix_type == GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return GGMLQuantizationType.F16  # rows must be whole 32-value blocks
    return matrix_type


def plan_tensors(
    config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], type: str = "f16"
) -> list[PlannedTensor]:
    """The GGUF tensors for a model's parameters ``shapes`` (Hugging Face names, no tied head).

    Matrices get ``type`` (Q8_0 only where rows are whole 32-value blocks, else F16, as
    llama.cpp's converter does); 1-D tensors and MoE routers stay F32.
    """
    arch = ARCHITECTURES[config.model_type]
    valid = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    groups: dict[str, dict[int, str]] = {}  # GGUF name -> expert index -> HF name
    for hf in shapes:
        name, index = _gguf_name(hf)
        groups.setdefault(name, {})[index] = hf
    plan = []
    for name, by_index in groups.items():
        # Every name must be one that llama.cpp's graph for this architecture looks up.
        if re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0]) not in valid:
            raise ExportError(f"{name} is not a tensor of llama.cpp's {MODEL_ARCH_NAMES[arch]}")
        sources = tuple(by_index[i] for i in sorted(by_index))
        shape = tuple(shapes[sources[0]])
        if "_exps." in name:  # experts stacked into one (experts, rows, columns) tensor
            if sorted(by_index) != list(range(config.num_experts or 0)):
                raise ExportError(f"{name}: experts {sorted(by_index)} of {config.num_experts}")
            shape = (len(sources), *shape)
        plan.append(PlannedTensor(name, sources, shape, _tensor_type(name, shape, TYPES[type][0])))
    return plan


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's byte-level BPE reads them.

    Ids past the tokenizer (the embedding's padding rows) become unused ``[PADn]`` tokens, as
    in llama.cpp's converter; the merges are recovered from the rank-ordered vocabulary.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
            f"{vocab_size} rows"
        )
    tokens, types = [], []
    ranks: dict[bytes, int] = {}
    for i in range(vocab_size):
        b = tokenizer.id_to_bytes(i) if i < tokenizer.vocab_size else b""
        if tokenizer.is_special(i):
            text = b.decode("utf-8")
            tokens.append(text)
            types.append(
                TokenType.CONTROL if _CONTROL_RE.fullmatch(text) else TokenType.USER_DEFINED
            )
        elif b:
            ranks[b] = i
            tokens.append(_bytelevel(b))
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [f"{_bytelevel(a)} {_bytelevel(b)}" for a, b in bpe_merges(ranks)]
    return tokens, [int(t) for t in types], merges


def check_output(out: str | os.PathLike[str], *, type: str, force: bool = False) -> Path:
    """``out`` as a Path, or ExportError for an unknown ``type`` or an output that cannot be
    written (or exists, without ``force``)."""
    if type not in TYPES:
        raise ExportError(f"unknown GGUF type {type!r}", hint=f"choose one of {', '.join(TYPES)}")
    out = Path(out).expanduser()
    folder = out.parent
    if out.is_dir():
        raise ExportError(f"{out} is a folder", hint="pass the path of the .gguf file to write")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists", hint="pass --force (force=True) to replace it")
    if not folder.is_dir():
        raise ExportError(f"output folder {folder} does not exist", hint="create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {folder} is not writable")
    return out


def _metadata(
    w: gguf.GGUFWriter,
    config: ModelConfig,
    tokenizer: Tokenizer,
    chat_template: str | None,
    type: str,
    name: str | None,
) -> None:
    w.add_type("model")
    if name:
        w.add_name(name)
    w.add_file_type(TYPES[type][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    if config.head_dim_override:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(float(scaling["factor"]))
        if kind == "yarn":
            original = scaling.get("original_max_position_embeddings")
            w.add_rope_scaling_orig_ctx_len(int(original or config.max_position_embeddings))
    if config.is_moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)

    tokens, types, merges = vocabulary(tokenizer, config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # Qwen's split pattern (digits one by one), tokenizer.QWEN_PATTERN
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    for add, value in (
        (
            w.add_bos_token_id,
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id,
        ),
        (w.add_eos_token_id, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos),
        (w.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if value is not None:
            add(int(value))
    w.add_add_bos_token(False)  # Qwen prompts start without a BOS token
    if chat_template:
        w.add_chat_template(chat_template)


def _encode(t: torch.Tensor, kind: GGMLQuantizationType) -> np.ndarray:
    t = t.detach().to("cpu", torch.float32).contiguous()
    if kind == GGMLQuantizationType.F32:
        return t.numpy()
    if kind == GGMLQuantizationType.F16:
        return t.to(torch.float16).numpy()
    # Q8_0 from gguf's reference quantizer: per 32 values d = max|x| / 127 (stored as f16) and
    # q = round(x / d) (half away from zero), as ggml's quantize_row_q8_0_ref.
    return gguf.quants.quantize(t.numpy(), kind)


def _nbytes(shape: Sequence[int], kind: GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    n = int(np.prod(shape))
    return n // block * size


def _verify(path: Path, arch: str, plan: list[PlannedTensor], n_tokens: int) -> None:
    """Re-open the written file with qwenlm's bounds-checked reader and compare it to the plan."""
    with gguf_format.GGUFFile(path) as gf:
        found = {name: (info.shape, info.ggml_type) for name, info in gf.tensors.items()}
        wanted = {t.name: (t.shape, int(t.ggml_type)) for t in plan}
        if found != wanted:
            bad = sorted(set(found.items()) ^ set(wanted.items()))[:3]
            raise ExportError(f"the written GGUF differs from what was planned: {bad}")
        tokens = gf.metadata.get("tokenizer.ggml.tokens")
        if gf.architecture != arch or tokens is None or len(tokens) != n_tokens:
            raise ExportError(
                "the written GGUF's architecture or vocabulary is not what was planned"
            )


def write_gguf(
    out: str | os.PathLike[str],
    *,
    config: ModelConfig,
    tokenizer: Tokenizer,
    chat_template: str | None,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], torch.Tensor],
    type: str = "f16",
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Write a GGUF file that llama.cpp loads, atomically; returns its path.

    ``shapes`` lists every parameter to write under its Hugging Face name (leave the output
    head out when it is tied to the embedding: llama.cpp then uses ``token_embd``), and
    ``read(name)`` returns one of them. ``type`` is ``f32``, ``f16`` or ``q8_0``.
    """
    out = check_output(out, type=type, force=force)
    check_exportable(config)
    plan = plan_tensors(config, shapes, type)
    arch = MODEL_ARCH_NAMES[ARCHITECTURES[config.model_type]]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            _metadata(w, config, tokenizer, chat_template, type, name)
            for t in plan:
                # The header holds every tensor's shape, type and size before any data.
                if t.ggml_type in _NUMPY_TYPES:
                    w.add_tensor_info(
                        t.name, t.shape, _NUMPY_TYPES[t.ggml_type], _nbytes(t.shape, t.ggml_type)
                    )
                else:  # quantized: rows of blocks, declared by their byte shape
                    w.add_tensor_info(
                        t.name,
                        gguf.quants.quant_shape_to_byte_shape(t.shape, t.ggml_type),
                        np.dtype(np.uint8),
                        _nbytes(t.shape, t.ggml_type),
                        raw_dtype=t.ggml_type,
                    )
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in plan:
                parts = [read(s) for s in t.sources]
                data = parts[0] if len(parts) == 1 else torch.stack(parts)
                if tuple(data.shape) != t.shape:
                    raise ExportError(
                        f"{t.sources[0]} has shape {list(data.shape)}, expected {list(t.shape)}"
                    )
                w.write_tensor_data(_encode(data, t.ggml_type))
        finally:
            w.close()
        _verify(tmp, arch, plan, config.vocab_size)

    try:
        atomic_write(out, write)
    except OSError as e:  # a full disk, a folder that turned read-only
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    return out
