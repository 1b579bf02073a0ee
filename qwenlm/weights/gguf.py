"""GGUF reading: a bounds-checked header parser, tensor access, and the mapping to HF names.

The format's constants come from the ``gguf`` package. The parser is ours because every length
and count in a GGUF header comes from the file: each one is checked against the bytes that remain
before anything is allocated or looped over, so a corrupt or hostile file fails with one line
instead of hanging or exhausting memory. (gguf's GGUFReader also takes ~20 s on the default
model's 300k-entry vocabulary; this parser takes well under a second.)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from qwenlm.errors import CheckpointError
from qwenlm.weights import quants

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 26  # no key, token or template in a real file comes near 64 MiB

_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY_DTYPES: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF's ne[] reversed
    ggml_type: int
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        """The GGML type's name (F32, Q8_0, Q4_K ...), or ``typeN`` for an unknown code N."""
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"


def _supported_type_names() -> list[str]:
    return sorted(GGMLQuantizationType(t).name for t in quants.BLOCK_INFO)


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf: memoryview | bytes | mmap.mmap, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"malformed GGUF file {self.path}: {what} (at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file; is it truncated?")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALARS[vtype]
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if etype in _SCALARS:
                size = _SCALARS[etype][1]
                if count > (self.size - self.pos) // size:
                    raise self.fail(f"{what} claims {count} elements, more than the file holds")
                arr = np.frombuffer(
                    self.buf, dtype=_NUMPY_DTYPES[etype], count=count, offset=self.pos
                )
                self.pos += count * size
                return arr.copy()
            if etype == GGUFValueType.STRING:
                # Each string needs at least its 8-byte length.
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"{what} claims {count} strings, more than the file holds")
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if etype == GGUFValueType.ARRAY:
                raise self.fail(f"{what}: nested arrays are not supported")
            raise self.fail(f"{what} has unknown element type {etype}")
        raise self.fail(f"{what} has unknown value type {vtype}")


class GGUFFile:
    """An open GGUF file: its metadata, tensor directory, and bounds-checked tensor reads.

    Use as a context manager, or call :meth:`close`; tensors read from it are copies, so they
    stay valid after it is closed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise CheckpointError(f"cannot open GGUF file {self.path}: {e.strerror}") from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 24:
                raise CheckpointError(f"malformed GGUF file {self.path}: only {size} bytes")
            # Copy-on-write mapping: pages are shared with the page cache and torch gets a
            # writable buffer without any write ever reaching the file.
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self._mm, str(self.path))
        magic = bytes(self._mm[:4])
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"{self.path} is not a GGUF file (magic {magic!r}, expected b'GGUF')"
            )
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = "big-endian GGUF files are not supported" if self.version > 0xFFFF else None
            raise CheckpointError(
                f"unsupported GGUF version {self.version} in {self.path}", hint=hint
            )
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Smallest possible entries: a KV is 8 (key length) + 4 (type) + 1 bytes; a tensor info
        # 8 + 4 + 4 + 8 bytes. Counts beyond that cannot be real.
        if n_kv > cur.size // 13 or n_tensors > cur.size // 24:
            raise cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors")

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.u32(f"type of {key}")
            if key in metadata:
                raise cur.fail(f"duplicate metadata key {key!r}")
            metadata[key] = cur.value(vtype, key)
        self.metadata = metadata

        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment must be a power of two, got {alignment!r}")

        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name} has {n_dims} dimensions")
            ne = [cur.u64(f"dimension of {name}") for _ in range(n_dims)]
            ggml_type = cur.u32(f"type of {name}")
            offset = cur.u64(f"offset of {name}")
            infos.append((name, tuple(reversed(ne)), ggml_type, offset))

        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            if name in self.tensors:
                raise cur.fail(f"duplicate tensor {name!r}")
            info = self._place(cur, name, shape, ggml_type, data_start + offset)
            if offset % alignment:
                raise CheckpointError(
                    f"malformed GGUF file {self.path}: tensor {name} offset is not aligned",
                    hint="the file may be truncated; pull or download it again",
                )
            self.tensors[name] = info

    def _place(
        self, cur: _Cursor, name: str, shape: tuple[int, ...], ggml_type: int, start: int
    ) -> TensorInfo:
        """Tensor ``name``'s entry, once its shape, type and bytes are checked to fit the file."""
        if any(d <= 0 for d in shape):
            raise cur.fail(f"tensor {name} has shape {list(shape)}")
        if ggml_type not in quants.BLOCK_INFO:
            try:
                tname = GGMLQuantizationType(ggml_type).name
            except ValueError:
                tname = f"unknown type {ggml_type}"
            raise CheckpointError(
                f"GGUF tensor {name} in {self.path} uses {tname}, which qwenlm cannot read",
                hint="supported: " + ", ".join(_supported_type_names()),
            )
        n_elements = 1
        for d in shape:
            n_elements *= d
        block = quants.BLOCK_INFO[ggml_type][0]
        if shape[-1] % block:
            raise cur.fail(f"tensor {name} row length {shape[-1]} is not a multiple of {block}")
        nbytes = quants.tensor_nbytes(ggml_type, n_elements)
        if start + nbytes > cur.size:
            raise CheckpointError(
                f"malformed GGUF file {self.path}: data of tensor {name} "
                f"(bytes {start}..{start + nbytes}) lies outside the file ({cur.size} bytes)",
                hint="the file may be truncated; pull or download it again",
            )
        return TensorInfo(name, shape, ggml_type, start, nbytes)

    @property
    def architecture(self) -> str | None:
        """``general.architecture``: qwen2, qwen2moe, qwen3, qwen (Qwen1) ..."""
        return self.metadata.get("general.architecture")

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's stored bytes as a 1-D uint8 tensor (a copy)."""
        info = self.tensors[name]
        view = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return torch.from_numpy(view.copy())

    def _row_span(self, info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int, tuple]:
        """(file offset, bytes, shape) of rows ``start .. stop`` of a tensor viewed as a matrix
        (see :meth:`load`; all of it if None)."""
        shape, offset, nbytes = info.shape, info.offset, info.nbytes
        if rows is not None:
            start, stop = rows
            n_rows = matrix_rows(shape)
            if not 0 <= start <= stop <= n_rows:
                raise ValueError(f"rows {rows} out of range for {info.name} with {n_rows} rows")
            block = quants.BLOCK_INFO[info.ggml_type][0]
            if len(shape) == 1 and block != 1 and (start, stop) != (0, n_rows):
                raise ValueError(f"{info.name} is a quantized vector: read it whole")
            # Rows are whole blocks (the row length is a multiple), or single elements of an
            # unquantized vector.
            row_bytes = nbytes // n_rows if (start, stop) != (0, n_rows) else 0
            if row_bytes:
                offset, nbytes = offset + start * row_bytes, (stop - start) * row_bytes
            shape = (stop - start,) if len(shape) == 1 else (stop - start, shape[-1])
        return offset, nbytes, shape

    def raw_rows(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A matrix's stored bytes, rows ``start .. stop``, as a (rows, row bytes) uint8 copy."""
        info = self.tensors[name]
        offset, nbytes, shape = self._row_span(info, rows)
        view = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=offset)
        out = torch.from_numpy(view.copy()).view(shape[0], info.nbytes // matrix_rows(info.shape))
        self._drop_pages(offset, nbytes)
        return out

    def load(
        self, name: str, dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor dequantized to ``dtype``, in torch (row-major) shape.

        ``rows=(start, stop)`` reads only those rows of the tensor viewed as a matrix (leading
        dimensions flattened: row ``e * n + r`` of an (E, n, k) stack of experts is row ``r``
        of expert ``e``; the elements of a 1-D tensor), so a large matrix can be converted
        piece by piece and one expert read without the others. The result is (stop - start,
        k), or (stop - start,) for a 1-D tensor.
        """
        info = self.tensors[name]
        offset, nbytes, shape = self._row_span(info, rows)
        view = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=offset)
        # The ACCESS_COPY mapping is writable, so torch can wrap it without a copy; dequantize
        # writes only into its own output.
        out = quants.dequantize(torch.from_numpy(view), info.ggml_type, shape, dtype=dtype)
        self._drop_pages(offset, nbytes)
        return out

    def _drop_pages(self, offset: int, nbytes: int) -> None:
        # Pages of the file read through the mapping count as this process's resident memory
        # until it is closed: a whole 0.4 GB file by the end of loading. They were only read
        # (never written), so dropping them just leaves them in the OS page cache.
        if not isinstance(self._mm, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            self._mm.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            # BufferError: a numpy view still exists; the mapping goes when it does.
            with contextlib.suppress(BufferError):
                mm.close()
            self._mm = None
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
            self._file = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# GGUF tensor names (llama.cpp's, as gguf's TENSOR_NAMES spells them for the qwen, qwen2,
# qwen2moe, qwen3 and qwen3moe architectures) -> Hugging Face Qwen2 / Qwen3 names.
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that hold several Hugging Face tensors: every expert's matrix stacked into one
# (n_expert, rows, cols) tensor, and Qwen1's fused Q, K, V (as many key/value heads as heads).
_EXPERTS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_FUSED_QKV = {"attn_qkv.weight": "weight", "attn_qkv.bias": "bias"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def matrix_rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor viewed as a matrix (leading dimensions flattened; a vector's elements)."""
    n = 1
    for d in shape[:-1] if len(shape) > 1 else shape:
        n *= d
    return n


@dataclass(frozen=True)
class Piece:
    """Where a Hugging Face tensor of ``shape`` lies in a GGUF file: ``rows`` rows of tensor
    ``name`` viewed as a matrix (see :meth:`GGUFFile.load`), from row ``start``."""

    name: str
    start: int
    rows: int
    shape: tuple[int, ...]


def _layer_pieces(i: int, rest: str, info: TensorInfo) -> dict[str, Piece]:
    prefix = f"model.layers.{i}."
    shape = info.shape
    if rest in _LAYER_MAP:
        # llama.cpp stores the shared expert's gate, a (1, hidden) matrix, as a vector.
        target = (1, shape[-1]) if rest == "ffn_gate_inp_shexp.weight" else shape
        return {prefix + _LAYER_MAP[rest]: Piece(info.name, 0, matrix_rows(shape), target)}
    if rest in _EXPERTS:
        if len(shape) != 3:
            raise CheckpointError(f"GGUF tensor {info.name} has shape {list(shape)}, not 3-D")
        n, rows, cols = shape
        proj = _EXPERTS[rest]
        return {
            f"{prefix}mlp.experts.{e}.{proj}.weight": Piece(info.name, e * rows, rows, (rows, cols))
            for e in range(n)
        }
    if rest in _FUSED_QKV:
        if shape[0] % 3:
            raise CheckpointError(f"GGUF tensor {info.name} has {shape[0]} rows, not 3 equal parts")
        rows, kind = shape[0] // 3, _FUSED_QKV[rest]
        return {
            f"{prefix}self_attn.{p}.{kind}": Piece(info.name, j * rows, rows, (rows, *shape[1:]))
            for j, p in enumerate(("q_proj", "k_proj", "v_proj"))
        }
    return {}  # e.g. rope_freqs, which no Qwen file needs


def tensor_map(gf: GGUFFile) -> dict[str, Piece]:
    """Every Hugging Face tensor the file holds, by name, and where it lies."""
    out: dict[str, Piece] = {}
    for name, info in gf.tensors.items():
        if name in _GLOBAL_MAP:
            out[_GLOBAL_MAP[name]] = Piece(name, 0, matrix_rows(info.shape), info.shape)
        elif m := _BLOCK_RE.fullmatch(name):
            out.update(_layer_pieces(int(m.group(1)), m.group(2), info))
    return out


def read(
    gf: GGUFFile,
    piece: Piece,
    dtype: torch.dtype = torch.float32,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The tensor a :class:`Piece` describes, or only its rows start..stop."""
    n = piece.shape[0]
    a, b = rows if rows is not None else (0, n)
    if not 0 <= a <= b <= n:
        raise ValueError(f"rows {rows} out of range for a tensor with {n} rows")
    k = piece.rows // n  # stored rows per row: several where a vector holds a 1-row matrix
    t = gf.load(piece.name, dtype, (piece.start + a * k, piece.start + b * k))
    return t.reshape(b - a, *piece.shape[1:])


def iter_tensors(
    gf: GGUFFile, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, dequantized tensor) one at a time, so peak memory stays one tensor."""
    for hf, piece in tensor_map(gf).items():
        yield hf, read(gf, piece, dtype)
