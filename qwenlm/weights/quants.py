"""Dequantize GGML/GGUF tensor data with vectorized torch ops.

Each ``_deq_*`` function takes the raw blocks of one type as a ``(n_blocks, bytes_per_block)``
uint8 tensor and returns ``(n_blocks, elements_per_block)`` float32 values. The formulas and the
order of float32 operations follow ggml's ``dequantize_row_*`` (ggml-quants.c), so results match
``gguf.quants.dequantize`` bit for bit. All multi-byte fields are little-endian, as in GGUF.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# Elements per chunk of work. Temporaries scale with the chunk (about 22 bytes per element at
# peak), not the tensor: the 151936 x 896 embedding table (519 MiB as float32) needs ~90 MiB
# more. Much smaller chunks cost speed: each chunk runs ~15 small ops, each a parallel region.
CHUNK_ELEMENTS = 1 << 22

QK_K = 256  # elements per K-quant super-block


def _reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View the last dim of a uint8 tensor as ``dtype``, copying only when strides or the
    storage offset do not allow a view."""
    size = dtype.itemsize
    strides = raw.stride()
    if strides[-1] != 1 or any(s % size for s in strides[:-1]) or raw.storage_offset() % size:
        # Not .contiguous(): it keeps odd strides on size-1 dims, which view() rejects.
        raw = raw.clone(memory_format=torch.contiguous_format)
    return raw.view(dtype)


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 field at byte ``offset`` of every block, as float32 of shape (n_blocks, 1)."""
    return _reinterpret(blocks[:, offset : offset + 2], torch.float16).float()


# Bit-field splitters. They copy their input to contiguous memory first and shift by Python
# scalars: on CPU both are several times faster than working on strided slices of the blocks
# or shifting uint8 by a broadcast tensor of shift amounts.


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Split bytes (..., k) into (..., 2, k): low nibbles, then high nibbles."""
    qs = qs.contiguous()
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """Split bytes (..., k) into (..., 4, k): 2-bit fields at bits 0-1, then 2-3, 4-5, 6-7."""
    qs = qs.contiguous()
    return torch.stack([(qs >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-2)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """Split bytes (..., k) into (..., 8, k): bit 0 of every byte, then bit 1, and so on."""
    qh = qh.contiguous()
    return torch.stack([(qh >> bit) & 1 for bit in range(8)], dim=-2)


def _deq_f32(blocks: torch.Tensor) -> torch.Tensor:
    return _reinterpret(blocks, torch.float32)


def _deq_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _reinterpret(blocks, torch.float16).float()


def _deq_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return _reinterpret(blocks, torch.bfloat16).float()


# The float32 arithmetic below runs in place on the one float temporary per chunk; the values
# (and their rounding) are those of ggml's expressions, since x * d == d * x exactly.


def _deq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: 16 bytes; element j is the low nibble of qs[j], element j+16 the high one.
    d = _half(blocks, 0)
    q = _nibbles(blocks[:, 2:]).reshape(-1, 32)
    return q.float().sub_(8).mul_(d)


def _deq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qs: 16 bytes (nibbles as in Q4_0, unsigned, offset by m).
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _nibbles(blocks[:, 4:]).reshape(-1, 32)
    return q.float().mul_(d).add_(m)


_BIT_INDEX = torch.arange(32, dtype=torch.int32)


def _q5_quants(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian uint32 whose bit j is bit 4 of element j; shift the whole word
    # (an int32 shift by a tensor is vectorized, unlike a uint8 one).
    word = _reinterpret(qh, torch.int32)
    high = ((word >> _BIT_INDEX.to(word.device)) & 1).to(torch.uint8)
    return _nibbles(qs).reshape(-1, 32) | (high << 4)


def _deq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | qh: 4 bytes | qs: 16 bytes
    d = _half(blocks, 0)
    q = _q5_quants(blocks[:, 2:6], blocks[:, 6:])
    return q.float().sub_(16).mul_(d)


def _deq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qh: 4 bytes | qs: 16 bytes
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _q5_quants(blocks[:, 4:8], blocks[:, 8:])
    return q.float().mul_(d).add_(m)


def _deq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: 32 x int8
    return blocks[:, 2:].view(torch.int8).float().mul_(_half(blocks, 0))


def _deq_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales: 16 bytes (low nibble scale, high nibble min) | qs: 64 bytes | d: f16 | dmin: f16.
    # Each 128-element half uses 32 bytes of qs; its four 2-bit planes are 32 elements each.
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _half(blocks, 80), _half(blocks, 82)
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    q = _crumbs(blocks[:, 16:80].reshape(n, 2, 32)).reshape(n, 16, 16)
    return q.float().mul_(dl).sub_(ml).reshape(n, QK_K)


def _deq_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask: 32 bytes | qs: 64 bytes | scales: 12 bytes | d: f16.
    n = blocks.shape[0]
    d = _half(blocks, 108)
    # 16 signed 6-bit scales: low 4 bits are the nibbles of bytes 0-7 (all low nibbles first),
    # high 2 bits are the 2-bit fields of bytes 8-11 (bits 0-1 of all four first).
    raw = blocks[:, 96:108]
    low = _nibbles(raw[:, :8]).reshape(n, 16)
    high = _crumbs(raw[:, 8:]).reshape(n, 16)
    sc = (low | (high << 4)).float() - 32
    dl = (d * sc).unsqueeze(-1)
    # Low 2 bits as in Q2_K; bit b of hmask[l] is the high bit of element 32*b + l, and a
    # *clear* high bit means subtract 4.
    ql = _crumbs(blocks[:, 32:96].reshape(n, 2, 32)).reshape(n, 16, 16)
    qh = _bits(blocks[:, :32]).reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)
    return q.float().mul_(dl).reshape(n, QK_K)


def _k_scale_min(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K field into eight 6-bit scales and eight 6-bit mins.

    Bytes 0-3 hold scales 0-3 (bits 0-5) and the top bits of scales 4-7 (bits 6-7);
    bytes 4-7 the same for the mins; bytes 8-11 the low 4 bits of scale 4+i (low nibble)
    and min 4+i (high nibble).
    """
    raw = raw.reshape(-1, 3, 4)
    s, m, lo = raw[:, 0], raw[:, 1], raw[:, 2]
    sc = torch.cat([s & 0x3F, (lo & 0x0F) | ((s >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (lo >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: each sub-block's scale and min, (n, 8, 1), from d, dmin and 12 bytes."""
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)


def _deq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes. Each 32-byte run of qs holds
    # two 32-element sub-blocks: low nibbles, then high nibbles.
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)
    return q.float().mul_(dl).sub_(ml).reshape(n, QK_K)


def _deq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes | qs: 128 bytes. Low 4 bits as in
    # Q4_K; bit b of qh[l] is the high bit of element 32*b + l.
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    ql = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48]).reshape(n, 8, 32)
    q = ql | (qh << 4)
    return q.float().mul_(dl).sub_(ml).reshape(n, QK_K)


def _deq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql: 128 bytes | qh: 64 bytes | scales: 16 x int8 | d: f16. Per 128-element half:
    # 64 bytes of ql (low nibbles of elements 0-63, then high nibbles for 64-127) and
    # 32 bytes of qh (2-bit planes for elements 0-31, 32-63, 64-95, 96-127).
    n = blocks.shape[0]
    d = _half(blocks, 208)
    sc = blocks[:, 192:208].view(torch.int8).float()
    dl = (d * sc).unsqueeze(-1)
    ql = _nibbles(blocks[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = _crumbs(blocks[:, 128:192].reshape(n, 2, 32)).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return q.reshape(n, 16, 16).float().mul_(dl).reshape(n, QK_K)


_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _deq_f32,
    T.F16: _deq_f16,
    T.BF16: _deq_bf16,
    T.Q4_0: _deq_q4_0,
    T.Q4_1: _deq_q4_1,
    T.Q5_0: _deq_q5_0,
    T.Q5_1: _deq_q5_1,
    T.Q8_0: _deq_q8_0,
    T.Q2_K: _deq_q2_k,
    T.Q3_K: _deq_q3_k,
    T.Q4_K: _deq_q4_k,
    T.Q5_K: _deq_q5_k,
    T.Q6_K: _deq_q6_k,
}

# ggml type id -> (elements per block, bytes per block), for every supported type.
BLOCK_INFO: dict[int, tuple[int, int]] = {int(t): GGML_QUANT_SIZES[T(t)] for t in _DEQUANTIZERS}


def _type_name(qtype: int) -> str:
    try:
        return T(qtype).name
    except ValueError:
        return f"unknown type {qtype}"


def _block_info(qtype: int) -> tuple[int, int]:
    try:
        return BLOCK_INFO[qtype]
    except KeyError:
        raise ValueError(
            f"unsupported GGML tensor type {_type_name(qtype)} (id {qtype}); supported: "
            + ", ".join(_type_name(t) for t in sorted(BLOCK_INFO))
        ) from None


def supported_types() -> set[int]:
    """The ggml type ids that :func:`dequantize` handles."""
    return set(BLOCK_INFO)


def tensor_nbytes(qtype: int, n_elements: int) -> int:
    """Bytes of raw data for ``n_elements`` values of type ``qtype``."""
    block_size, type_size = _block_info(qtype)
    if n_elements < 0 or n_elements % block_size:
        raise ValueError(
            f"{_type_name(qtype)} stores whole blocks of {block_size} elements; "
            f"{n_elements} elements is not a multiple"
        )
    return n_elements // block_size * type_size


def dequantize(
    data: torch.Tensor,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Decode the raw bytes of one GGML tensor into a new ``dtype`` tensor of ``shape``.

    ``data`` is a 1-D uint8 tensor holding exactly the tensor's bytes; ``shape`` is the torch
    (row-major) shape, i.e. the reverse of GGUF's dimension order. Work is done in chunks of
    about ``chunk_elements`` (default :data:`CHUNK_ELEMENTS`) so temporaries stay small; the
    result lives on ``data``'s device.
    """
    block_size, type_size = _block_info(qtype)
    name = _type_name(qtype)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(
            f"expected raw data as a 1-D uint8 tensor, got {data.dtype} with shape "
            f"{tuple(data.shape)}"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dequantize needs a floating-point output dtype, got {dtype}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"invalid tensor shape {shape}")
    if shape and shape[-1] % block_size:
        raise ValueError(
            f"{name} rows must be whole blocks of {block_size} elements; shape {shape} is not"
        )
    n_elements = math.prod(shape)
    expected = tensor_nbytes(qtype, n_elements)
    if data.numel() != expected:
        raise ValueError(
            f"{name} tensor of shape {shape} needs {expected} bytes of data, got {data.numel()}"
        )

    deq = _DEQUANTIZERS[qtype]
    blocks = data.reshape(-1, type_size)
    blocks_per_chunk = max(1, (chunk_elements or CHUNK_ELEMENTS) // block_size)
    out = torch.empty(n_elements, dtype=dtype, device=data.device)
    for start in range(0, blocks.shape[0], blocks_per_chunk):
        values = deq(blocks[start : start + blocks_per_chunk])
        out[start * block_size : start * block_size + values.numel()] = values.reshape(-1)
    return out.reshape(shape)
