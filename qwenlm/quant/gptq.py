"""GPTQ and AWQ checkpoints (Qwen's -GPTQ-Int4 / -GPTQ-Int8 / -AWQ releases) in our layers.

Both formats store a linear layer as integer codes ``q`` with, per group of ``group_size``
inputs and per output, a scale ``s`` and a zero point ``z``: ``w = (q - z) * s``. The packing,
as their definitions write it (AutoGPTQ's ``QuantLinear.pack``, AutoAWQ's
``WQLinear_GEMM.from_linear``):

- **GPTQ** (AutoGPTQ / optimum, ``quant_method: gptq``): ``qweight`` int32 (in * bits / 32,
  out), each word holding 32 / bits consecutive inputs from its lowest bits up; ``qzeros``
  int32 (groups, out * bits / 32), packed the same way along the outputs; ``scales`` (groups,
  out); ``g_idx`` (in,), the group of each input (with act-order, ``desc_act``, not sorted).
  The original format (``checkpoint_format`` ``gptq``, the default) stores ``z - 1`` and its
  kernels add 1 back after masking; ``gptq_v2`` stores ``z``.
- **AWQ** (AutoAWQ GEMM, ``quant_method: awq``, ``version: gemm``): 4 bits, ``qweight`` int32
  (in, out / 8), each word holding 8 outputs in the order 0 2 4 6 1 3 5 7 from its lowest bits
  up; ``qzeros`` (groups, out / 8) packed the same way; ``scales`` (groups, out); ``z`` as
  stored; groups are consecutive inputs.

Each layer is read and converted on its own (in slabs of outputs), so no float copy of the
model exists. 4-bit layers whose groups are a multiple of 32 inputs become :class:`Int4Linear`
(the native kernels): ``scale = s`` and ``min = -z * s``, both float16. ``s`` is float16 in the
checkpoint, so only ``min`` rounds: by at most 2^-11 of ``|z * s|``, under 1/128 of a
quantization step, and not at all for symmetric checkpoints (z = 8: 8 * s is exact). A group of
256 or of the whole row (``group_size`` -1) becomes groups of 128 with the same scale and
minimum. With act-order the columns are reordered at load so that each group's inputs are
contiguous, and :class:`PermutedInput` applies the same order to the activations: a gather of
one row of inputs per token, against a matrix product over the whole weight, and the only way
the group-wise kernels can run such a layer. Everything else (8 and 2 bits, group sizes such
as 16, uneven ``g_idx``) becomes :class:`GroupQuantLinear`, which computes
``(q - z) * s`` exactly in float32 with PyTorch ops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenlm.errors import CheckpointError
from qwenlm.quant.linear import DenseLinear, Int4Linear

METHODS = ("gptq", "awq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
# AWQ's GEMM packing: field i of a word holds output _AWQ_ORDER[i] of its 8, so output j is
# in field _AWQ_FIELD[j].
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_FIELD = tuple(_AWQ_ORDER.index(j) for j in range(8))
# Outputs unpacked at a time: bounds the int32 temporaries of one layer to tens of MB.
_SLAB_WEIGHTS = 4 << 20


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's ``quantization_config``, checked."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group per row
    zero_offset: int  # added to stored zero points (1 for GPTQ's original format)
    sym: bool  # GPTQ: every zero point is 2^(bits - 1)

    @property
    def mode(self) -> str:
        return f"{self.method}-int{self.bits}"


def parse_scheme(q: Mapping[str, Any]) -> Scheme:
    """The scheme of a GPTQ or AWQ ``quantization_config``; one clear error for any other."""
    method = q.get("quant_method")
    bits, group_size = q.get("bits"), q.get("group_size", -1)
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise CheckpointError(f"quantization_config: bad group_size {group_size!r}")
    if method == "gptq":
        fmt = q.get("checkpoint_format") or "gptq"
        if bits not in (2, 4, 8) or fmt not in GPTQ_FORMATS:
            raise CheckpointError(
                f"unsupported GPTQ checkpoint: bits {bits!r}, checkpoint_format {fmt!r}",
                hint="qwenlm reads GPTQ with 2, 4 or 8 bits in the gptq and gptq_v2 formats",
            )
        return Scheme("gptq", bits, group_size, int(fmt == "gptq"), bool(q.get("sym", False)))
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or q.get("zero_point", True) is not True:
            raise CheckpointError(
                f"unsupported AWQ checkpoint: bits {bits!r}, version {version!r}, "
                f"zero_point {q.get('zero_point', True)!r}",
                hint="qwenlm reads AWQ's GEMM format: 4 bits with zero points",
            )
        return Scheme("awq", 4, group_size, 0, False)
    raise CheckpointError(f"unsupported quant_method {method!r}", hint="gptq or awq")


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., W) int32 words -> (..., W, 32 / bits) unsigned bit fields, lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    # The arithmetic shift copies the sign bit in; the mask removes it.
    return (words[..., None] >> shifts) & ((1 << bits) - 1)


def _unpack_inputs(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's qweight (in * bits / 32, n) -> codes (n, in): input r * (32 / bits) + j of
    output c is field j of word (r, c)."""
    f = _fields(qweight.T, bits)  # (n, in * bits / 32, 32 / bits)
    return f.reshape(f.shape[0], -1).to(torch.uint8)


def _unpack_outputs(packed: torch.Tensor, bits: int, awq: bool) -> torch.Tensor:
    """Codes packed along the outputs (rows, n * bits / 32) -> (n, rows); AWQ's fields hold
    the outputs of each word in its own order."""
    f = _fields(packed, bits)  # (rows, words, 32 / bits)
    if awq:
        f = f[..., list(_AWQ_FIELD)]
    return f.reshape(f.shape[0], -1).T.to(torch.int16)


@dataclass
class QuantizedMatrix:
    """One layer unpacked: w[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g], g = groups[k]."""

    codes: torch.Tensor  # (n, k) uint8
    zeros: torch.Tensor  # (n, groups) int16
    scales: torch.Tensor  # (n, groups) float32, the checkpoint's values
    groups: torch.Tensor  # (k,) int64
    scales_fp16: bool  # the scales are float16 values (Int4Linear stores float16)

    def dequantize(self) -> torch.Tensor:
        g = self.groups
        return (self.codes.float() - self.zeros[:, g].float()) * self.scales[:, g]


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], integer: bool) -> None:
    if tuple(t.shape) != shape:
        raise CheckpointError(
            f"checkpoint tensor {name} has shape {list(t.shape)}, expected {list(shape)}",
            hint="the tensors and config.json's quantization_config disagree",
        )
    if integer and t.dtype != torch.int32:
        raise CheckpointError(f"checkpoint tensor {name} is {t.dtype}, expected int32")


def read_matrix(
    read: Any, name: str, shapes: Mapping[str, tuple[int, ...]], n: int, k: int, s: Scheme
) -> QuantizedMatrix:
    """Read and unpack layer ``name`` ((n, k) as a float layer) of a GPTQ / AWQ checkpoint."""
    per = 32 // s.bits
    gs = k if s.group_size == -1 else s.group_size
    n_groups = math.ceil(k / gs)
    if k % per or n % per:
        raise CheckpointError(f"{name}: {n}x{k} does not pack into {s.bits}-bit words")
    scales = read(f"{name}.scales")
    _check(f"{name}.scales", scales, (n_groups, n), integer=False)
    fp16 = bool((scales.to(torch.float16).float() == scales).all())
    qzeros = read(f"{name}.qzeros")
    _check(f"{name}.qzeros", qzeros, (n_groups, n // per), integer=True)
    qweight = read(f"{name}.qweight")
    if s.method == "gptq":
        _check(f"{name}.qweight", qweight, (k // per, n), integer=True)
        if f"{name}.g_idx" in shapes:
            groups = read(f"{name}.g_idx").long()
            _check(f"{name}.g_idx", groups, (k,), integer=False)
            if groups.numel() and not (int(groups.min()) >= 0 and int(groups.max()) < n_groups):
                raise CheckpointError(f"{name}.g_idx holds groups outside 0..{n_groups - 1}")
        else:
            groups = torch.arange(k) // gs
        codes = torch.empty(n, k, dtype=torch.uint8)
        step = max(1, _SLAB_WEIGHTS // k)
        for a in range(0, n, step):
            codes[a : a + step] = _unpack_inputs(qweight[:, a : a + step], s.bits)
    else:
        _check(f"{name}.qweight", qweight, (k, n // per), integer=True)
        groups = torch.arange(k) // gs
        codes = torch.empty(n, k, dtype=torch.uint8)
        step = max(1, _SLAB_WEIGHTS // (k * per))  # in words of 8 outputs
        for a in range(0, n // per, step):
            codes[a * per : (a + step) * per] = _unpack_outputs(qweight[:, a : a + step], 4, True)
    zeros = _unpack_outputs(qzeros, s.bits, s.method == "awq") + s.zero_offset
    if s.sym and not bool((zeros == 1 << (s.bits - 1)).all()):
        found = sorted(set(zeros.unique().tolist()))[:4]
        raise CheckpointError(
            f"{name}: quantization_config says sym, but the zero points are {found}, "
            f"not {1 << (s.bits - 1)}",
            hint="is checkpoint_format right (gptq stores zero - 1, gptq_v2 the zero itself)?",
        )
    return QuantizedMatrix(codes, zeros, scales.T.contiguous(), groups, fp16)


# -- layers -----------------------------------------------------------------------------------


class GroupQuantLinear(nn.Module):
    """Integer codes with a scale and zero point per group of inputs, any bits, any grouping:
    the weight is dequantized exactly in float32 for each call (PyTorch ops, no native
    kernel). Holds one byte a weight."""

    def __init__(self, m: QuantizedMatrix, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = m.codes.shape
        self.register_buffer("codes", m.codes.contiguous())
        self.register_buffer("zeros", m.zeros.contiguous())
        self.register_buffer("scales", m.scales.float().contiguous())
        self.register_buffer("groups", m.groups.contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    def dequantize(self) -> torch.Tensor:
        g = self.groups
        return (self.codes.float() - self.zeros[:, g].float()) * self.scales[:, g]

    @classmethod
    def concat(cls, mods: list[GroupQuantLinear]) -> nn.Module:
        if any(not torch.equal(m.groups, mods[0].groups) for m in mods):
            return ConcatLinear(mods)
        m = QuantizedMatrix(
            torch.cat([m.codes for m in mods]),
            torch.cat([m.zeros for m in mods]),
            torch.cat([m.scales for m in mods]),
            mods[0].groups,
            scales_fp16=False,
        )
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods]
        has_bias = any(m.bias is not None for m in mods)
        return cls(m, torch.cat(biases) if has_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class PermutedInput(nn.Module):
    """A layer whose weight columns were reordered by ``perm`` (act-order groups made
    contiguous): it sees the inputs in the same order, ``inner(x[..., perm])``."""

    def __init__(self, perm: torch.Tensor, inner: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.register_buffer("perm", perm.long().contiguous())
        self.inner = inner

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def dequantize(self) -> torch.Tensor:
        """The weight in the checkpoint's column order."""
        w = self.inner.dequantize()
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    @classmethod
    def concat(cls, mods: list[PermutedInput]) -> nn.Module:
        # Q, K and V (gate and up) see the same input, so GPTQ orders their columns alike.
        if any(not torch.equal(m.perm, mods[0].perm) for m in mods):
            return ConcatLinear(mods)
        inner = type(mods[0].inner).concat([m.inner for m in mods])
        return cls(mods[0].perm, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.perm))


class ConcatLinear(nn.Module):
    """Layers on one input whose weights cannot be merged into one: their outputs side by side."""

    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(mods)
        self.in_features = mods[0].in_features
        self.out_features = sum(m.out_features for m in mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


def _int4_bytes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (n, k) in Int4Linear's constructor layout: byte j of each 64 inputs holds
    input j in its low half and input j + 32 in its high half."""
    n, k = codes.shape
    c = codes.view(n, k // 64, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def _int4_group(k: int, gs: int) -> int | None:
    """The Int4Linear group size (32, 64 or 128) that tiles groups of ``gs`` inputs, if any."""
    if k % 64:
        return None
    return next((g for g in (128, 64, 32) if gs % g == 0 and k % g == 0), None)


def make_layer(m: QuantizedMatrix, bias: torch.Tensor | None, s: Scheme) -> nn.Module:
    """The layer for one unpacked matrix: Int4Linear where its groups fit (columns reordered
    for act-order), GroupQuantLinear otherwise."""
    k = m.codes.shape[1]
    gs = k if s.group_size == -1 else s.group_size
    perm = torch.argsort(m.groups, stable=True)
    contiguous = torch.equal(m.groups[perm], torch.arange(k) // gs)
    group = _int4_group(k, gs)
    if s.bits != 4 or not m.scales_fp16 or group is None or not contiguous:
        return GroupQuantLinear(m, bias)
    # Each checkpoint group of gs inputs is gs / group Int4Linear groups with its values.
    reps = gs // group
    scales = m.scales.repeat_interleave(reps, dim=1)[:, : k // group]
    mins = (-(m.zeros.float() * m.scales)).repeat_interleave(reps, dim=1)[:, : k // group]
    order = perm if not torch.equal(perm, torch.arange(k)) else None
    codes = m.codes if order is None else m.codes[:, order]
    layer = Int4Linear(_int4_bytes(codes), scales, mins, bias, group)
    return layer if order is None else PermutedInput(order, layer)


# -- loading ------------------------------------------------------------------------------------


def load_gptq_awq(ckpt: Any) -> nn.Module:
    """Build a model from an open GPTQ or AWQ :class:`~qwenlm.weights.Checkpoint`.

    Quantized layers (those with a ``qweight``) are converted one at a time; layers the
    checkpoint keeps in floating point (the output head, MoE routers) become float32
    :class:`DenseLinear` layers, the embedding a float32 table.
    """
    from qwenlm.models import model_class, swap_module

    s = parse_scheme(ckpt.quantization)
    if ckpt.qwen1:
        raise CheckpointError(
            "Qwen1 GPTQ checkpoints are not supported", hint="use a Qwen2, Qwen2.5 or Qwen3 one"
        )
    config = ckpt.config
    shapes = ckpt.shapes()
    with torch.device("meta"):
        model = model_class(config)(config)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            new = _load_linear(ckpt, name, module, shapes, s)
            if new is not None:
                model.set_submodule(name, new)
        elif isinstance(module, nn.Embedding):
            table = ckpt.read(f"{name}.weight")
            if tuple(table.shape) != tuple(module.weight.shape):
                raise CheckpointError(
                    f"checkpoint tensor {name}.weight has shape {list(table.shape)}"
                )
            model.set_submodule(name, nn.Embedding.from_pretrained(table, freeze=True))
    if "lm_head.weight" not in shapes and "lm_head.qweight" not in shapes:
        # A tied output head: the embedding's table (the same storage) on the native kernel.
        model.lm_head = DenseLinear(model.model.embed_tokens.weight.detach(), None)
    for pname, param in list(model.named_parameters()):
        if param.is_meta:
            if pname not in shapes:
                raise CheckpointError(f"checkpoint is missing tensor {pname}")
            value = ckpt.read(pname)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"checkpoint tensor {pname} has shape {list(value.shape)}")
            swap_module(model, pname, nn.Parameter(value.float(), False))
    model.quantization = {
        "mode": s.mode,
        "group_size": s.group_size,
        "head": None,
        "method": s.method,
    }
    return model.eval()


def _load_linear(
    ckpt: Any, name: str, module: nn.Linear, shapes: Mapping, s: Scheme
) -> nn.Module | None:
    n, k = module.weight.shape
    bias = ckpt.read(f"{name}.bias") if f"{name}.bias" in shapes else None
    if bias is not None and tuple(bias.shape) != (n,):
        raise CheckpointError(f"checkpoint tensor {name}.bias has shape {list(bias.shape)}")
    if module.bias is None and bias is not None:
        if bool(bias.any()):
            raise CheckpointError(f"checkpoint has a bias for {name}, which has none")
        bias = None  # some writers store zero biases for every quantized layer
    if module.bias is not None and bias is None:
        raise CheckpointError(f"checkpoint is missing tensor {name}.bias")
    if f"{name}.qweight" in shapes:
        return make_layer(read_matrix(ckpt.read, name, shapes, n, k, s), bias, s)
    if f"{name}.weight" in shapes:
        weight = ckpt.read(f"{name}.weight")
        if tuple(weight.shape) != (n, k):
            raise CheckpointError(f"checkpoint tensor {name}.weight has shape {list(weight.shape)}")
        return DenseLinear(weight, bias)
    if name == "lm_head":
        return None  # tied to the embedding
    raise CheckpointError(f"checkpoint has neither {name}.qweight nor {name}.weight")
