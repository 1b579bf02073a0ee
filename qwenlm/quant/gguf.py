"""GGUF's block formats run as stored: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K.

:func:`pack` rearranges a GGUF tensor's bytes for the kernels and :func:`unpack` restores them
exactly; no value is widened or re-quantized. Each group of 8 output rows is interleaved per
block so that one 32-byte load holds 4 weights of each of the 8 rows (the layout is spelled out
at the top of the GGUF section of cpu_kernels.c): row counts are padded to a multiple of 8
with zero blocks, which contribute nothing. A :class:`GGUFLinear` holds one or more parts (a
fused q/k/v projection whose tensors have different formats), each with its own format; float
tensors (F32, F16, BF16) become float32 parts.
"""

from __future__ import annotations

import ctypes
import itertools

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qwenlm.kernels import Kind, LinearDesc
from qwenlm.quant.linear import KernelLinear, linear_desc
from qwenlm.weights import quants
from qwenlm.weights.quants import _crumbs, _nibbles

GROUP = 8  # output rows interleaved per block
KINDS = {
    T.Q4_0: Kind.Q4_0,
    T.Q4_1: Kind.Q4_1,
    T.Q5_0: Kind.Q5_0,
    T.Q5_1: Kind.Q5_1,
    T.Q8_0: Kind.Q8_0,
    T.Q4_K: Kind.Q4_K,
    T.Q5_K: Kind.Q5_K,
    T.Q6_K: Kind.Q6_K,
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
_BITS = torch.arange(8, dtype=torch.uint8)
# Q5_0/Q5_1: the element at byte i of a lane of nibble vector p: (p % 2) * 16 + 4 * (p // 2) + i.
_Q5_ELEMENT = torch.tensor([[(p % 2) * 16 + 4 * (p // 2) + i for p in range(8)] for i in range(4)])


def _words(x: torch.Tensor) -> torch.Tensor:
    """(G, nb, 8 rows, n bytes) -> (G, nb, 8 * n): 32-byte vectors whose lane r holds 4 bytes of
    row r (vector v: bytes 4v .. 4v + 3 of every row)."""
    G, nb, rows, n = x.shape
    return x.reshape(G, nb, rows, n // 4, 4).transpose(2, 3).reshape(G, nb, rows * n)


def _unwords(x: torch.Tensor, n: int) -> torch.Tensor:
    G, nb, _ = x.shape
    return x.reshape(G, nb, n // 4, GROUP, 4).transpose(2, 3).reshape(G, nb, GROUP, n)


def _to_bits(b: torch.Tensor) -> torch.Tensor:
    """Bytes (..., n) -> bits (..., n, 8), least significant first."""
    return (b[..., None] >> _BITS) & 1


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bits (..., 8) -> bytes (...)."""
    return (bits << _BITS).sum(-1, dtype=torch.int32).to(torch.uint8)


def _q5_pack(b: torch.Tensor) -> torch.Tensor:
    """ggml's Q5_0/Q5_1 qh (4 bytes) and qs (16 bytes) of (G, nb, 8) blocks -> the kernels'
    160 bytes: H, then B_0 .. B_3 (32-byte vectors, lane r = row r, byte i).

    Nibble vector p (the kernels' u[p], 0..7) holds element ``_Q5_ELEMENT[i, p]`` at byte i.
    B_k's byte: bits 0-4 = u[k]'s 5-bit value, bits 5-7 = bits 0-2 of u[4 + k]'s; H's byte:
    bits 2k, 2k + 1 = bits 3, 4 of u[4 + k]'s. Unpacking then costs 24 vector operations a
    block instead of 35 with the 5th bits in a plane of their own (one AND for u[0..3]),
    which is a tenth of a Q5_0 block's work for one row.
    """
    G, nb = b.shape[:2]
    qh, qs = b[..., :4], b[..., 4:20]
    bit5 = _to_bits(qh).reshape(G, nb, GROUP, 32)
    nib = torch.cat([qs & 15, qs >> 4], -1)  # (G, nb, 8, 32): element e's low 4 bits
    v = nib | (bit5 << 4)
    u = v[..., _Q5_ELEMENT]  # (G, nb, 8 rows, 4 i, 8 p)
    lo, hi = u[..., :4], u[..., 4:]  # u[k], u[4 + k] for k = 0..3
    vecs = (lo | ((hi & 7) << 5)).permute(0, 1, 4, 2, 3)  # (G, nb, k, r, i)
    h = ((hi >> 3) << (2 * torch.arange(4, dtype=torch.uint8))).sum(-1, dtype=torch.int32)
    return torch.cat([h.to(torch.uint8).reshape(G, nb, 32), vecs.reshape(G, nb, 128)], -1)


def _q5_unpack(c: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_q5_pack`: (G, nb, 160) -> ggml's qh | qs, (G, nb, 8, 20)."""
    G, nb = c.shape[:2]
    h = c[..., :32].reshape(G, nb, GROUP, 4)  # (.., r, i)
    vecs = c[..., 32:].reshape(G, nb, 4, GROUP, 4).permute(0, 1, 3, 4, 2)  # (.., r, i, k)
    crumbs = (h[..., None] >> (2 * torch.arange(4, dtype=torch.uint8))) & 3
    u = torch.cat([vecs & 31, (vecs >> 5) | (crumbs << 3)], -1)  # (.., r, i, p)
    v = torch.empty(G, nb, GROUP, 32, dtype=torch.uint8)
    v[..., _Q5_ELEMENT] = u
    qs = (v[..., :16] & 15) | ((v[..., 16:] & 15) << 4)
    qh = _from_bits(((v >> 4) & 1).reshape(G, nb, GROUP, 4, 8))
    return torch.cat([qh, qs], -1)


def _q5k_pack(qh: torch.Tensor) -> torch.Tensor:
    # (G, nb, 8, 32): bit j of byte l = 5th bit of element 32 j + l
    # -> per sub-block j a 32-byte vector: lane r byte i, bit k = element 32 j + 4 k + i
    G, nb = qh.shape[:2]
    bits = _to_bits(qh).reshape(G, nb, GROUP, 8, 4, 8)  # (.., r, k, i, j)
    return _from_bits(bits.permute(0, 1, 5, 2, 4, 3)).reshape(G, nb, 256)


def _q5k_unpack(h: torch.Tensor) -> torch.Tensor:
    G, nb = h.shape[:2]
    bits = _to_bits(h.reshape(G, nb, 8, GROUP, 4))  # (.., j, r, i, k)
    return _from_bits(bits.permute(0, 1, 3, 5, 4, 2)).reshape(G, nb, GROUP, 32)


def _q6_values(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """ggml's Q6_K bytes (ql 128, qh 64 per row) -> 256 six-bit values per row, in order."""
    lead = ql.shape[:-1]
    low = _nibbles(ql.reshape(*lead, 2, 64)).reshape(*lead, 256)
    high = _crumbs(qh.reshape(*lead, 2, 32)).reshape(*lead, 256)
    return low | (high << 4)


def _q6_pack(q: torch.Tensor) -> torch.Tensor:
    # (G, nb, 8, 256) values -> per 32-element chunk s: ql (4 vectors) and qh (2 vectors)
    G, nb = q.shape[:2]
    v = q.reshape(G, nb, GROUP, 8, 2, 4, 4)  # (.., r, s, half, k, i)
    low = v & 15
    ql = (low[:, :, :, :, 0] | (low[:, :, :, :, 1] << 4)).permute(0, 1, 3, 4, 2, 5)
    top = (v >> 4).reshape(G, nb, GROUP, 8, 2, 2, 2, 4)  # (.., r, s, half, X, kk, i)
    shift = (2 * (2 * torch.arange(2)[:, None] + torch.arange(2)[None, :])).to(torch.uint8)
    qh = (top << shift.T[:, None, :, None]).sum((4, 6), dtype=torch.int32).to(torch.uint8)
    qh = qh.permute(0, 1, 3, 4, 2, 5)  # (.., s, X, r, i)
    return torch.cat([ql.reshape(G, nb, 8, 128), qh.reshape(G, nb, 8, 64)], -1).reshape(G, nb, -1)


def _q6_unpack(c: torch.Tensor) -> torch.Tensor:
    G, nb = c.shape[:2]
    c = c.reshape(G, nb, 8, 192)
    ql = c[..., :128].reshape(G, nb, 8, 4, GROUP, 4).permute(0, 1, 4, 2, 3, 5)  # (.., r, s, k, i)
    qh = c[..., 128:].reshape(G, nb, 8, 2, GROUP, 4).permute(0, 1, 4, 2, 3, 5)  # (.., r, s, X, i)
    low = torch.stack([ql & 15, ql >> 4], dim=4)  # (.., r, s, half, k, i)
    shift = (2 * (2 * torch.arange(2)[:, None] + torch.arange(2)[None, :])).to(torch.uint8)
    # top bits of (half, X, kk): qh[X] >> 2 (2 kk + half)
    top = (qh[:, :, :, :, None, :, None, :] >> shift.T[:, None, :, None]) & 3
    q = low | (top.reshape(G, nb, GROUP, 8, 2, 4, 4) << 4)
    return q.reshape(G, nb, GROUP, 256)


def _q6_ggml(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """256 six-bit values per row -> ggml's ql (128) and qh (64) bytes."""
    lead = q.shape[:-1]
    v = q.reshape(*lead, 2, 4, 32)  # (half h, quarter p, l): element 128 h + 32 p + l
    low = v & 15
    ql = torch.cat(
        [low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], -1
    )
    shift = (2 * torch.arange(4)).to(torch.uint8)[:, None]
    qh = ((v >> 4) << shift).sum(-2, dtype=torch.int32).to(torch.uint8)
    return ql.reshape(*lead, 128), qh.reshape(*lead, 64)


def _record(qtype: int, b: torch.Tensor) -> torch.Tensor:
    """ggml blocks of GROUP rows (G, nb, 8, block bytes) -> the kernels' records (G, nb, rec)."""
    G, nb = b.shape[:2]

    def halves(off: int) -> torch.Tensor:
        return b[..., off : off + 2].reshape(G, nb, 16)

    if qtype in (T.Q4_0, T.Q8_0):
        return torch.cat([halves(0), _words(b[..., 2:])], -1)
    if qtype == T.Q4_1:
        return torch.cat([halves(0), halves(2), _words(b[..., 4:])], -1)
    if qtype == T.Q5_0:
        return torch.cat([halves(0), _q5_pack(b[..., 2:])], -1)
    if qtype == T.Q5_1:
        return torch.cat([halves(0), halves(2), _q5_pack(b[..., 4:])], -1)
    if qtype == T.Q4_K:
        return torch.cat([halves(0), halves(2), _words(b[..., 4:16]), _words(b[..., 16:])], -1)
    if qtype == T.Q5_K:
        parts = [halves(0), halves(2), _words(b[..., 4:16]), _q5k_pack(b[..., 16:48])]
        return torch.cat([*parts, _words(b[..., 48:])], -1)
    # Q6_K: ql 128 | qh 64 | scales 16 x int8 | d
    scales = b[..., 192:208].reshape(G, nb, GROUP, 8, 2).transpose(2, 3).reshape(G, nb, 128)
    chunks = _q6_pack(_q6_values(b[..., :128], b[..., 128:192]))
    return torch.cat([halves(208), scales, chunks], -1)


def _blocks(qtype: int, r: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_record`: (G, nb, rec) -> ggml blocks (G, nb, 8, block bytes)."""
    G, nb = r.shape[:2]

    def halves(off: int) -> torch.Tensor:
        return r[..., off : off + 16].reshape(G, nb, GROUP, 2)

    if qtype in (T.Q4_0, T.Q8_0):
        return torch.cat([halves(0), _unwords(r[..., 16:], r.shape[-1] // 8 - 2)], -1)
    if qtype == T.Q4_1:
        return torch.cat([halves(0), halves(16), _unwords(r[..., 32:], 16)], -1)
    if qtype == T.Q5_0:
        return torch.cat([halves(0), _q5_unpack(r[..., 16:])], -1)
    if qtype == T.Q5_1:
        return torch.cat([halves(0), halves(16), _q5_unpack(r[..., 32:])], -1)
    if qtype == T.Q4_K:
        parts = [halves(0), halves(16), _unwords(r[..., 32:128], 12)]
        return torch.cat([*parts, _unwords(r[..., 128:], 128)], -1)
    if qtype == T.Q5_K:
        parts = [halves(0), halves(16), _unwords(r[..., 32:128], 12), _q5k_unpack(r[..., 128:384])]
        return torch.cat([*parts, _unwords(r[..., 384:], 128)], -1)
    scales = r[..., 16:144].reshape(G, nb, 8, GROUP, 2).transpose(2, 3).reshape(G, nb, GROUP, 16)
    ql, qh = _q6_ggml(_q6_unpack(r[..., 144:]))
    return torch.cat([ql, qh, scales, halves(0)], -1)


def record_bytes(qtype: int) -> int:
    """Bytes of one interleaved block of GROUP rows."""
    return GROUP * GGML_QUANT_SIZES[T(qtype)][1]


def pack(qtype: int, raw: torch.Tensor) -> torch.Tensor:
    """ggml rows (rows, row bytes) uint8 -> the kernels' layout (groups, blocks, record bytes);
    rows are padded to a multiple of GROUP with zero blocks."""
    rows, row_bytes = raw.shape
    bs = GGML_QUANT_SIZES[T(qtype)][1]
    pad = -rows % GROUP
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad, row_bytes)])
    b = raw.reshape(-1, GROUP, row_bytes // bs, bs).transpose(1, 2)
    return _record(qtype, b).contiguous()


def unpack(qtype: int, packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (rows, row bytes) uint8, exactly the file's bytes."""
    b = _blocks(qtype, packed)  # (G, nb, 8, bs)
    G, nb, _, bs = b.shape
    return b.transpose(1, 2).reshape(G * GROUP, nb * bs)[:rows]


class GGUFLinear(KernelLinear):
    """A projection in GGUF block formats, as the file stores them.

    ``parts`` are (ggml type, rows, tensor): a packed uint8 tensor from :func:`pack`, or a
    float32 (rows, in_features) tensor for float types. The parts' outputs are concatenated.
    All are held in one byte buffer ``qweight``.
    """

    kernel_multiple = 32
    kernel_rows = None  # prefill too: the multi-row kernels beat dequantize + matmul

    def __init__(
        self,
        parts: list[tuple[int, int, torch.Tensor]],
        in_features: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(rows for _, rows, _ in parts)
        self.parts: list[tuple[int, int, int, int]] = []  # (type, rows, byte offset, bytes)
        chunks, offset = [], 0
        for qtype, rows, t in parts:
            data = t.contiguous().view(torch.uint8).reshape(-1)
            pad = -data.numel() % 64  # keep every part 64-byte aligned in the buffer
            chunks += [data, data.new_zeros(pad)]
            self.parts.append((int(qtype), rows, offset, data.numel()))
            offset += data.numel() + pad
        self.register_buffer("qweight", torch.cat(chunks) if len(chunks) > 2 else chunks[0])
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    @classmethod
    def concat(cls, mods: list[GGUFLinear]) -> GGUFLinear:
        parts = [
            (qtype, rows, m._data(i)) for m in mods for i, (qtype, rows, _, _) in enumerate(m.parts)
        ]
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat(
                [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods]
            )
        return cls(parts, mods[0].in_features, bias)

    def _data(self, i: int) -> torch.Tensor:
        """Part i's tensor: packed bytes (groups, blocks, record) or float32 (rows, in)."""
        qtype, rows, offset, n = self.parts[i]
        data = self.qweight[offset : offset + n]
        if qtype in FLOAT_TYPES:
            return data.view(torch.float32).view(rows, self.in_features)
        nb = self.in_features // GGML_QUANT_SIZES[T(qtype)][0]
        return data.view(-1, nb, record_bytes(qtype))

    def raw(self, i: int) -> torch.Tensor:
        """Part i's bytes exactly as the GGUF file stored them (rows, row bytes)."""
        return unpack(self.parts[i][0], self._data(i), self.parts[i][1])

    def _dequantize_part(self, i: int) -> torch.Tensor:
        qtype, rows = self.parts[i][:2]
        if qtype in FLOAT_TYPES:
            return self._data(i)
        return quants.dequantize(self.raw(i).reshape(-1), qtype, (rows, self.in_features))

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.cat([self._dequantize_part(i) for i in range(len(self.parts))])
        if out is not None:
            out.copy_(w)
            return out
        return w

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the (single-part) weight as float32 (an embedding lookup)."""
        qtype, _rows, _, _ = self.parts[0]
        if qtype in FLOAT_TYPES:
            return self._data(0)[ids]
        flat = ids.reshape(-1)
        groups = self._data(0)[flat // GROUP]  # (n, nb, rec)
        raw = _blocks(qtype, groups)  # (n, nb, 8, bs)
        raw = raw[torch.arange(flat.numel()), :, flat % GROUP].reshape(flat.numel(), -1)
        out = quants.dequantize(raw.reshape(-1), qtype, (flat.numel(), self.in_features))
        return out.view(*ids.shape, self.in_features)

    def _describe(self) -> LinearDesc:
        descs, row = [], 0
        for i, (qtype, rows, _, _) in enumerate(self.parts):
            kind = Kind.F32 if qtype in FLOAT_TYPES else KINDS[qtype]
            bias = None if self.bias is None else self.bias[row : row + rows]
            descs.append(linear_desc(kind, self._data(i), rows, self.in_features, bias=bias))
            row += rows
        for a, b in itertools.pairwise(descs):
            a.next = ctypes.pointer(b)  # the pointer object keeps b alive
        return descs[0]

    def extra_repr(self) -> str:
        names = ",".join(T(qtype).name for qtype, *_ in self.parts)
        return super().extra_repr() + f", formats={names}"


class GGUFEmbedding(torch.nn.Module):
    """Embedding rows read from a GGUF table. With ``shared=True`` the table is a tied model's
    output head (not registered here a second time), so it is held once."""

    def __init__(self, table: GGUFLinear, *, shared: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        if shared:
            self._shared = [table]  # a list: not a submodule
        else:
            self.table = table

    @property
    def _table(self) -> GGUFLinear:
        return self._shared[0] if hasattr(self, "_shared") else self.table

    @property
    def weight(self) -> torch.Tensor:
        # Tools that inspect `embed_tokens.weight` get the float values.
        return self._table.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() > 16:
            return self._table.rows(ids)
        return self.rows_of(ids.reshape(-1).tolist()).view(*ids.shape, self.embedding_dim)

    def rows_of(self, ids: list[int]) -> torch.Tensor:
        """Rows ``ids`` as a new (len(ids), embedding_dim) tensor.

        Small lookups on the PyTorch path (no native kernels, rows with LoRA adapters; native
        decode steps read their rows in C, see fastpath.NativeForward) take the same few
        thousand tokens over and over: unpacking a row from its interleaved blocks is ~0.4 ms
        of torch ops, a dict hit microseconds.
        The rows are exact copies; a changed table (another tensor, or written in place)
        starts a new cache.
        """
        table = self._table.qweight
        key = (table.data_ptr(), table._version)
        cache = getattr(self, "_row_cache", None)
        if cache is None or cache[0] != key or len(cache[1]) >= self._cache_rows:
            cache = self._row_cache = (key, {})
        rows = cache[1]
        missing = [t for t in dict.fromkeys(ids) if t not in rows]
        if missing:
            got = self._table.rows(torch.tensor(missing, dtype=torch.long, device=table.device))
            rows.update(zip(missing, got.unbind(0), strict=True))
        if len(ids) == 1:
            return rows[ids[0]].clone().view(1, -1)
        return torch.stack([rows[t] for t in ids])

    @property
    def _cache_rows(self) -> int:
        return max(256, (16 << 20) // (4 * self.embedding_dim))  # 16 MB of float32 rows
