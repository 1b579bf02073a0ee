"""Weight quantization as transforms that swap a built model's Linear layers for quantized ones.

Modes (``MODES``):

- ``f32``: float32 weights on the native matrix-vector kernel (exact, 4 bytes a weight).
- ``int8``: int8 per output channel (symmetric); the embedding int8 per row.
- ``int4``: 4-bit groups of 32, 64 or 128 with a float16 scale and minimum each; the output head
  int8 unless ``head="int4"``; the embedding int8 per row.
- ``gguf``: a GGUF file's tensors in their own block formats (Q4_0 ... Q6_K), as stored
  (:mod:`qwenlm.quant.gguf`); only for GGUF files.

:func:`quantize` converts a float model in place. :func:`load_quantized` builds one straight
from a checkpoint, converting each matrix in slices of rows, so no full float32 copy of the
model (or even of the 545 MB embedding table) ever exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable

import torch
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError, QwenlmError
from qwenlm.fsutil import write_json
from qwenlm.models import model_class, swap_module
from qwenlm.quant.gguf import FLOAT_TYPES, GROUP, KINDS, GGUFEmbedding, GGUFLinear, pack
from qwenlm.quant.linear import (
    DenseLinear,
    Int4Linear,
    Int8Linear,
    KernelLinear,
    tiled_rows,
    untile_int8,
)

MODES = ("f32", "int8", "int4", "gguf")
GROUP_SIZES = (32, 64, 128)
# Rows converted at a time: bounds the float32 temporaries (a few copies of a slice) to tens
# of MB, which keeps the loading peak close to the quantized model's own size.
_CHUNK_BYTES = 16 << 20


class QuantizationError(QwenlmError):
    """An unknown mode or a layer shape the mode cannot hold."""


class Int8Embedding(nn.Module):
    """Embedding rows stored as int8 with one scale per row; looked-up rows are dequantized.

    :meth:`shared_with` builds one that reads a tied model's int8 output head (the same
    matrix, quantized the same way), so the table is held once, in the head's layout.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self._head: list[Int8Linear] = []  # a list: not registered as a submodule

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        q, s = Int8Linear.quantize(weight)
        return cls(q, s)

    @classmethod
    def shared_with(cls, head: Int8Linear) -> Int8Embedding:
        emb = cls(head.weight_codes(), head.scale)
        emb.qweight, emb.scale = head.qweight, head.scale  # the same storage
        emb._head.append(head)
        return emb

    @property
    def tiled(self) -> bool:
        # The head may switch its codes to the kernels' tiled layout in place.
        return bool(self._head) and self._head[0].tiled and self._head[0].qweight is self.qweight

    def codes(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """int8 codes of rows ``ids`` (all rows if None), in plain row order."""
        if not self.tiled:
            return self.qweight if ids is None else self.qweight[ids]
        return untile_int8(self.qweight) if ids is None else tiled_rows(self.qweight, ids)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            destination[prefix + "qweight"] = self.codes().contiguous()

    @property
    def weight(self) -> torch.Tensor:
        # Tied output heads and tools that inspect `embed_tokens.weight` get the float values.
        return self.codes().float() * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes(ids).float() * self.scale[ids][..., None]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps the loader's freed temporaries
    mapped, where they would stay in the resident size (and stack up between matrices)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


def _check(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise QuantizationError(
            f"unknown quantization mode {mode!r}", hint=f"use one of {', '.join(MODES)}"
        )
    if group_size not in GROUP_SIZES:
        raise QuantizationError(
            f"group size {group_size} is not supported", hint="use 32, 64 or 128"
        )


def _linear_factory(
    mode: str, group_size: int, head: str | None, name: str
) -> Callable[..., KernelLinear]:
    # "lm_head.linear": a tensor-parallel head's slice of the vocabulary
    is_head = name.split(".")[0] == "lm_head"
    kind = (head or ("int8" if mode == "int4" else mode)) if is_head else mode
    if kind == "f32":
        return lambda w, b: DenseLinear(w, b)
    if kind == "int8":
        return Int8Linear.from_float
    if kind == "int4":
        return lambda w, b: Int4Linear.from_float(w, b, group_size)
    raise QuantizationError(f"unknown head quantization {head!r}", hint="use f32, int8 or int4")


def quantize(
    model: nn.Module, mode: str = "int8", *, group_size: int = 32, head: str | None = None
) -> nn.Module:
    """Swap every ``nn.Linear`` (and the embedding, for int modes) of a built model in place."""
    _check(mode, group_size)
    if mode == "gguf":
        raise QuantizationError(
            "the gguf mode runs a GGUF file's own formats; it cannot convert a float model",
            hint="use int8 or int4 (an adapter is merged before quantization)",
        )
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            make = _linear_factory(mode, group_size, head, name)
            swap_module(
                model,
                name,
                make(module.weight.detach(), None if module.bias is None else module.bias.detach()),
            )
        elif isinstance(module, nn.Embedding) and mode != "f32":
            swap_module(model, name, Int8Embedding.from_float(module.weight.detach()))
    model.quantization = {"mode": mode, "group_size": group_size, "head": head}
    return model


def _rows_per_chunk(cols: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * cols))


def _chunked(
    read: Callable[[tuple[int, int]], torch.Tensor], rows: int, cols: int, convert: Callable
) -> nn.Module:
    """Convert a (rows, cols) matrix slice by slice into one module.

    ``convert`` makes a module from a float slice; every buffer it has is indexed by row, so
    the slices' buffers are copied into full-size ones allocated once (never concatenated,
    which would hold the matrix twice).
    """
    step = _rows_per_chunk(cols)
    first = convert(read((0, min(step, rows))))
    if step >= rows:
        return first
    full = {}
    for name, buf in first.named_buffers(recurse=False):
        full[name] = buf.new_empty((rows, *buf.shape[1:]))
        full[name][: buf.shape[0]] = buf
    for a in range(step, rows, step):
        part = convert(read((a, min(a + step, rows))))
        for name, buf in part.named_buffers(recurse=False):
            full[name][a : a + buf.shape[0]] = buf
        del part
    for name, buf in full.items():
        setattr(first, name, buf)
    for attr in ("out_features", "num_embeddings"):
        if hasattr(first, attr):
            setattr(first, attr, rows)
    return first


def runs_as_stored(ckpt: object) -> bool:
    """Whether ``--quant auto`` picks ``gguf`` for ``ckpt``: a block-quantized GGUF file of a
    dense Qwen2-family model whose every tensor the gguf kernels run as stored. Side by side
    on the default file (EPYC Zen 3, 2 threads, 2026-11-29) gguf decoded 1.4x and prefilled
    1.15x faster than int8 at the same perplexity, in 12% less memory. Float GGUF files keep
    int8 (gguf would run their matrices as float32: 4 bytes a weight)."""
    types = ckpt.stored_types()
    return (
        ckpt.format == "gguf"
        and ckpt.config.model_type == "qwen2"
        and not ckpt.config.is_moe
        and bool(types & set(KINDS))
        and types <= set(KINDS) | set(FLOAT_TYPES)
    )


def _gguf_linear(
    ckpt: object, wname: str, rows: int, cols: int, bias: torch.Tensor | None
) -> GGUFLinear:
    """A GGUF matrix in its stored format, packed for the kernels a slice of rows at a time."""
    qtype, first = ckpt.read_raw(wname, (0, 1))
    if qtype in FLOAT_TYPES:
        return GGUFLinear([(qtype, rows, ckpt.read(wname).float().contiguous())], cols, bias)
    if qtype not in KINDS:
        from gguf import GGMLQuantizationType

        raise QuantizationError(
            f"{wname} is stored as {GGMLQuantizationType(qtype).name}, which --quant gguf "
            "cannot run",
            hint="use --quant int8 or int4, or a file in "
            + ", ".join(t.name for t in KINDS)
            + ", F16 or F32",
        )
    step = GROUP * max(1, (4 << 20) // (GROUP * first.numel()))  # ~4 MB of the file a slice
    packed = None
    for a in range(0, rows, step):
        part = pack(qtype, ckpt.read_raw(wname, (a, min(rows, a + step)))[1])
        if packed is None:
            packed = part.new_empty(-(-rows // GROUP), *part.shape[1:])
        packed[a // GROUP : a // GROUP + part.shape[0]] = part
    return GGUFLinear([(qtype, rows, packed)], cols, bias)


def _same_matrix(ckpt: object, a: str, b: str, shapes: dict) -> bool:
    """Whether two stored matrices are copies of one (a tied embedding and head that a GGUF
    file stores twice, at different precisions): sampled rows agree to within a 4-bit
    quantization's error. Unrelated matrices differ by their own size."""
    if a not in shapes or b not in shapes or tuple(shapes[a]) != tuple(shapes[b]):
        return False
    rows = shapes[a][0]
    for start in range(0, rows, max(1, rows // 8)):
        r = (start, min(start + 4, rows))
        x, y = ckpt.read(a, r).float(), ckpt.read(b, r).float()
        if (x - y).abs().max() > 0.1 * y.abs().max():
            return False
    return True


def _load_matrix(
    ckpt: object,
    shapes: dict,
    name: str,
    module: nn.Module,
    mode: str,
    group_size: int,
    head: str | None,
) -> tuple[nn.Module, set[str]]:
    """Module ``name`` (a linear layer or the embedding) converted slice by slice from the
    checkpoint, and the names of the tensors it was made from."""
    wname = f"{name}.weight"
    if wname not in shapes:
        raise CheckpointError(f"checkpoint is missing tensor {wname}")
    expected = tuple(module.weight.shape)
    if tuple(shapes[wname]) != expected:
        raise CheckpointError(
            f"checkpoint tensor {wname} has shape {list(shapes[wname])}, but the config "
            f"implies {list(expected)}"
        )
    rows, cols = expected

    def read(r: tuple[int, int]) -> torch.Tensor:
        return ckpt.read(wname, r)

    if type(module) is nn.Linear:
        bname = f"{name}.bias"
        if module.bias is not None and bname not in shapes:
            raise CheckpointError(f"checkpoint is missing tensor {bname}")
        bias = ckpt.read(bname) if module.bias is not None else None
        if mode == "gguf":
            return _gguf_linear(ckpt, wname, rows, cols, bias), {wname, bname}
        make = _linear_factory(mode, group_size, head, name)
        new = _chunked(read, rows, cols, lambda w: make(w, None))
        if bias is not None:
            new.bias = bias.float().contiguous()
        return new, {wname, bname}
    if mode == "gguf":
        return GGUFEmbedding(_gguf_linear(ckpt, wname, rows, cols, None)), {wname}
    if mode == "f32":
        return nn.Embedding(rows, cols, _weight=ckpt.read(wname), _freeze=True), {wname}
    return _chunked(read, rows, cols, Int8Embedding.from_float), {wname}


def load_quantized(
    ckpt: object,
    mode: str = "int8",
    *,
    group_size: int = 32,
    head: str | None = None,
) -> nn.Module:
    """Build a quantized model from an open :class:`~qwenlm.weights.Checkpoint`.

    Linear weights and the embedding are read and converted a slice of rows at a time; norms
    and biases are read whole. Peak memory is the quantized model plus one slice.
    """
    _check(mode, group_size)
    config: ModelConfig = ckpt.config
    shapes = ckpt.shapes()
    with torch.device("meta"):
        model = model_class(config)(config)
    done: set[str] = set()
    # A tied model's embedding and output head are one matrix: with an int8 head (int8 and
    # int4 modes) or a GGUF one, the embedding reads the head's table instead of holding a
    # second copy. Where a file stores both (GGUF keeps the head at higher precision), the
    # head's wins.
    if mode == "gguf" and ckpt.format != "gguf":
        raise QuantizationError(
            "--quant gguf runs a GGUF file's own formats, and this checkpoint is not a GGUF file",
            hint="use int8, int4 or f32",
        )
    share = (
        mode != "f32"
        and (mode == "gguf" or (head or ("int8" if mode == "int4" else mode)) == "int8")
        and (
            config.tie_word_embeddings
            or "lm_head.weight" not in shapes
            or _same_matrix(ckpt, "model.embed_tokens.weight", "lm_head.weight", shapes)
        )
    )
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear and not isinstance(module, nn.Embedding):
            continue
        if share and name == "model.embed_tokens":
            continue  # made from the head below
        if f"{name}.weight" not in shapes and name == "lm_head":
            continue  # tied: built from the embedding below
        new, read = _load_matrix(ckpt, shapes, name, module, mode, group_size, head)
        done.update(read)
        swap_module(model, name, new)
        release_freed_memory()
    if "lm_head.weight" not in shapes:
        # The output head shares the embedding's values; as a kernel layer it is its own copy.
        if mode == "gguf":
            tied_head = _gguf_linear(
                ckpt, "model.embed_tokens.weight", config.vocab_size, config.hidden_size, None
            )
        else:
            make = _linear_factory(mode, group_size, head, "lm_head")
            tied_head = _chunked(
                lambda r: ckpt.read("model.embed_tokens.weight", r),
                config.vocab_size,
                config.hidden_size,
                lambda w: make(w, None),
            )
        swap_module(model, "lm_head", tied_head)
    if share:
        emb = (
            GGUFEmbedding(model.lm_head, shared=True)
            if mode == "gguf"
            else Int8Embedding.shared_with(model.lm_head)
        )
        swap_module(model, "model.embed_tokens", emb)
        done.add("model.embed_tokens.weight")
    for pname, param in list(model.named_parameters()):
        if pname in done:
            continue
        if pname not in shapes:
            raise CheckpointError(f"checkpoint is missing tensor {pname}")
        value = ckpt.read(pname)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"checkpoint tensor {pname} has shape {list(value.shape)}, but the config implies "
                f"{list(param.shape)}"
            )
        swap_module(model, pname, nn.Parameter(value.float(), requires_grad=False))
    model.quantization = {"mode": mode, "group_size": group_size, "head": head}
    return model.eval()


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a quantized model to ``device``, keeping a tied int8 embedding on its head's table
    (moving copies each buffer on its own)."""
    emb = model.model.embed_tokens
    shared = isinstance(emb, Int8Embedding) and bool(emb._head)
    model.to(device)
    if shared:
        model.model.embed_tokens = Int8Embedding.shared_with(model.lm_head)
    return model


# -- saving and reloading ------------------------------------------------------------------
QUANT_METHOD = "qwenlm"


def _saved_linear(ckpt: object, name: str, shapes: dict, group_size: int) -> KernelLinear:
    """The layer stored under ``name``, its kind told by which tensors exist."""
    bias = ckpt.read(f"{name}.bias") if f"{name}.bias" in shapes else None
    if f"{name}.mins" in shapes:
        return Int4Linear(
            ckpt.read(f"{name}.qweight"),
            ckpt.read(f"{name}.scales"),
            ckpt.read(f"{name}.mins"),
            bias,
            group_size,
        )
    if f"{name}.scale" in shapes:
        return Int8Linear(ckpt.read(f"{name}.qweight"), ckpt.read(f"{name}.scale"), bias)
    if f"{name}.weight" in shapes:
        return DenseLinear(ckpt.read(f"{name}.weight"), bias)
    raise CheckpointError(f"quantized checkpoint has no weights for {name}")


def load_saved(ckpt: object) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` (its config.json's quantization_config),
    or load a GPTQ / AWQ checkpoint (see :mod:`qwenlm.quant.gptq`)."""
    q = ckpt.quantization
    if q.get("quant_method") in ("gptq", "awq"):
        from qwenlm.quant.gptq import load_gptq_awq

        return load_gptq_awq(ckpt)
    if q.get("quant_method") != QUANT_METHOD or q.get("mode") not in MODES:
        raise CheckpointError(
            f"unsupported quantization_config {dict(q)}",
            hint="qwenlm reads the int8/int4/f32 checkpoints it writes, and GPTQ and AWQ ones",
        )
    config: ModelConfig = ckpt.config
    shapes = ckpt.shapes()
    with torch.device("meta"):
        model = model_class(config)(config)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            swap_module(
                model, name, _saved_linear(ckpt, name, shapes, int(q.get("group_size", 32)))
            )
        elif isinstance(module, nn.Embedding):
            if f"{name}.qweight" in shapes:
                swap_module(
                    model,
                    name,
                    Int8Embedding(ckpt.read(f"{name}.qweight"), ckpt.read(f"{name}.scale")),
                )
            else:
                swap_module(
                    model,
                    name,
                    nn.Embedding.from_pretrained(ckpt.read(f"{name}.weight"), freeze=True),
                )
    emb, head = model.model.embed_tokens, getattr(model, "lm_head", None)
    if (
        isinstance(emb, Int8Embedding)
        and isinstance(head, Int8Linear)
        and torch.equal(emb.qweight, head.qweight)
        and torch.equal(emb.scale, head.scale)
    ):
        model.model.embed_tokens = Int8Embedding.shared_with(head)
    for pname, param in list(model.named_parameters()):
        if param.is_meta:
            if pname not in shapes:
                raise CheckpointError(f"checkpoint is missing tensor {pname}")
            swap_module(model, pname, nn.Parameter(ckpt.read(pname).float(), requires_grad=False))
    model.quantization = {
        "mode": q["mode"],
        "group_size": q.get("group_size", 32),
        "head": q.get("head"),
    }
    return model.eval()


def save_quantized(
    model: nn.Module, folder: object, *, tokenizer: object, chat_template: str | None
) -> object:
    """Write a quantized model as a Hugging Face-style folder that ``qwenlm.load`` reads back.

    The model must not have fused projections (save before :func:`~qwenlm.api.load` prepares
    it for inference, as ``qwenlm quantize`` does).
    """
    from qwenlm.weights.hf_writer import write_hf_folder

    q = getattr(model, "quantization", None)
    if not q:
        raise QuantizationError(
            "the model is not quantized", hint="quantize it first, or save it as a plain model"
        )
    if q["mode"] == "gguf":
        raise QuantizationError(
            "a gguf-mode model is the GGUF file itself", hint="keep the file, or save int8 or int4"
        )
    if q.get("mode") not in MODES:
        raise QuantizationError(
            f"a {q['mode']} model (from a GPTQ / AWQ checkpoint) cannot be saved",
            hint="load the checkpoint itself where it is needed",
        )
    if any(hasattr(layer.self_attn, "qkv_proj") for layer in _layers(model)):
        raise QuantizationError(
            "the model's projections are fused for inference", hint="save it before fusing"
        )
    config: ModelConfig = model.config
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        # A tied model's embedding reads the head's table; safetensors stores each tensor's
        # own bytes, so a shared one is written as a copy (and shared again on loading).
        tensors[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    out = write_hf_folder(
        folder, config=config, tensors=tensors, tokenizer=tokenizer, chat_template=chat_template
    )
    hf = config.to_hf()
    hf["torch_dtype"] = "float32"
    hf["quantization_config"] = {"quant_method": QUANT_METHOD, **q}
    write_json(out / "config.json", hf)
    return out


def _layers(model: nn.Module) -> list[nn.Module]:
    return [getattr(layer, "layer", layer) for layer in model.model.layers]
