"""qwenlm.weights.quants against gguf's numpy reference dequantizer.

Every comparison here is exact (rtol=0, atol=0): dequantizing is a few float32 products and sums
per value in a fixed order, which gguf's reference does in the same order, so any difference is a
bug, not rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from qwenlm.weights import quants

REQUIRED = {
    T.F32,
    T.F16,
    T.BF16,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q8_0,
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
}

# Byte offsets of the f16 scale fields in each block, with the range of values to put there.
# Random bytes there would often be huge, inf or NaN; real files hold modest scales.
SCALE_FIELDS: dict[int, list[tuple[int, float, float]]] = {
    T.Q4_0: [(0, -2, 2)],
    T.Q4_1: [(0, -2, 2), (2, -2, 2)],
    T.Q5_0: [(0, -2, 2)],
    T.Q5_1: [(0, -2, 2), (2, -2, 2)],
    T.Q8_0: [(0, -2, 2)],
    T.Q2_K: [(80, -2, 2), (82, 0, 1)],
    T.Q3_K: [(108, -2, 2)],
    T.Q4_K: [(0, -2, 2), (2, 0, 1)],
    T.Q5_K: [(0, -2, 2), (2, 0, 1)],
    T.Q6_K: [(208, -2, 2)],
}

ALL_TYPES = sorted(quants.supported_types())


def _type_id(qtype: int) -> str:
    return T(qtype).name


def random_raw(qtype: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw bytes for a (rows, cols) tensor of ``qtype``, as a (rows, bytes_per_row) array."""
    rng = np.random.default_rng(seed)
    n = rows * cols
    if qtype == T.F32:
        return rng.uniform(-3, 3, n).astype(np.float32).view(np.uint8).reshape(rows, -1)
    if qtype == T.F16:
        return rng.uniform(-3, 3, n).astype(np.float16).view(np.uint8).reshape(rows, -1)
    if qtype == T.BF16:
        f32_bits = rng.uniform(-3, 3, n).astype(np.float32).view(np.uint32)
        return (f32_bits >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    block_size, type_size = GGML_QUANT_SIZES[T(qtype)]
    blocks = rng.integers(0, 256, size=(n // block_size, type_size), dtype=np.uint8)
    for offset, low, high in SCALE_FIELDS[qtype]:
        scale = rng.uniform(low, high, blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(raw, T(qtype))))


def as_tensor(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.reshape(-1).copy())


def shape_for(qtype: int, rows: int = 3, blocks_per_row: int = 4) -> tuple[int, int]:
    block_size = quants.BLOCK_INFO[qtype][0]
    return rows, max(block_size, 32) * blocks_per_row


def test_supported_types_cover_required() -> None:
    assert quants.supported_types() >= REQUIRED
    assert set(quants.BLOCK_INFO) == quants.supported_types()
    for qtype, info in quants.BLOCK_INFO.items():
        assert info == GGML_QUANT_SIZES[T(qtype)]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=_type_id)
def test_matches_gguf_reference(qtype: int) -> None:
    rows, cols = shape_for(qtype)
    raw = random_raw(qtype, rows, cols)
    out = quants.dequantize(as_tensor(raw), qtype, (rows, cols))
    assert out.dtype == torch.float32
    assert out.shape == (rows, cols)
    torch.testing.assert_close(out, reference(raw, qtype), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=_type_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_output(qtype: int, dtype: torch.dtype) -> None:
    rows, cols = shape_for(qtype)
    raw = random_raw(qtype, rows, cols, seed=1)
    out = quants.dequantize(as_tensor(raw), qtype, (rows, cols), dtype=dtype)
    assert out.dtype == dtype
    expected = reference(raw, qtype).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=_type_id)
def test_chunked_equals_unchunked(qtype: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, cols = shape_for(qtype, rows=7, blocks_per_row=5)
    data = as_tensor(random_raw(qtype, rows, cols, seed=2))
    whole = quants.dequantize(data, qtype, (rows, cols), chunk_elements=rows * cols)
    torch.testing.assert_close(
        whole, reference(data.numpy(), qtype).reshape(rows, cols), rtol=0, atol=0
    )
    block_size = quants.BLOCK_INFO[qtype][0]
    # Chunks of one block, and of three blocks: chunks straddle rows, the last one is partial.
    for blocks_per_chunk in (1, 3):
        chunked = quants.dequantize(
            data, qtype, (rows, cols), chunk_elements=blocks_per_chunk * block_size
        )
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    # The module constant is the default.
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 2 * block_size)
    torch.testing.assert_close(quants.dequantize(data, qtype, (rows, cols)), whole, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=_type_id)
def test_unaligned_data_slice(qtype: int) -> None:
    # Raw data sliced out of a larger buffer at an odd offset (e.g. a view into a whole file).
    rows, cols = shape_for(qtype)
    raw = random_raw(qtype, rows, cols, seed=3)
    buffer = torch.zeros(raw.size + 8, dtype=torch.uint8)
    buffer[3 : 3 + raw.size] = as_tensor(raw)
    out = quants.dequantize(buffer[3 : 3 + raw.size], qtype, (rows, cols))
    torch.testing.assert_close(out, reference(raw, qtype), rtol=0, atol=0)


def test_result_does_not_alias_input() -> None:
    data = as_tensor(random_raw(T.F32, 2, 32))
    out = quants.dequantize(data, T.F32, (2, 32))
    out.zero_()
    assert data.any()


def test_one_dimensional_and_empty_shapes() -> None:
    raw = random_raw(T.Q8_0, 1, 64)
    out = quants.dequantize(as_tensor(raw), T.Q8_0, (64,))
    torch.testing.assert_close(out, reference(raw, T.Q8_0).reshape(64), rtol=0, atol=0)
    empty = quants.dequantize(torch.empty(0, dtype=torch.uint8), T.Q4_K, (0, 256))
    assert empty.shape == (0, 256)


@pytest.mark.parametrize("delta", [-1, 1, -18])
def test_wrong_data_length_raises(delta: int) -> None:
    data = as_tensor(random_raw(T.Q4_0, 2, 64))
    bad = torch.zeros(data.numel() + delta, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 72 bytes"):
        quants.dequantize(bad, T.Q4_0, (2, 64))


def test_row_not_whole_blocks_raises() -> None:
    with pytest.raises(ValueError, match="whole blocks"):
        quants.dequantize(torch.zeros(36, dtype=torch.uint8), T.Q8_0, (4, 16))


def test_integer_output_dtype_raises() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        quants.dequantize(torch.zeros(34, dtype=torch.uint8), T.Q8_0, (32,), dtype=torch.int8)


def test_non_uint8_data_raises() -> None:
    with pytest.raises(ValueError, match="uint8"):
        quants.dequantize(torch.zeros(8, dtype=torch.float32), T.F32, (8,))


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0, 999])
def test_unsupported_type_raises(qtype: int) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        quants.dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (256,))
    with pytest.raises(ValueError, match="unsupported"):
        quants.tensor_nbytes(qtype, 256)


def test_tensor_nbytes() -> None:
    assert quants.tensor_nbytes(T.F32, 10) == 40
    assert quants.tensor_nbytes(T.BF16, 10) == 20
    assert quants.tensor_nbytes(T.Q4_0, 64) == 36
    assert quants.tensor_nbytes(T.Q5_0, 151936 * 896) == 151936 * 896 // 32 * 22
    assert quants.tensor_nbytes(T.Q6_K, 512) == 420
    with pytest.raises(ValueError, match="multiple"):
        quants.tensor_nbytes(T.Q4_K, 300)
