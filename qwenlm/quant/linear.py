"""Linear layers that run on qwenlm's CPU kernels: float32, int8 per channel, 4-bit groups
(and GGUF's block formats, in :mod:`qwenlm.quant.gguf`).

Each is a drop-in for ``nn.Linear`` (same ``in_features``, ``out_features``, ``bias``). Small
batches of rows (decoding) go to the native kernels, which read the stored weights directly;
larger ones (prefill) dequantize the weight once and use the fastest dense matrix multiply the
machine has. Without the kernels (no compiler, another device), PyTorch ops compute the same.
"""

from __future__ import annotations

import ctypes
import threading

import torch
from torch import nn

from qwenlm.kernels import Kind, LinearDesc, cpu_kernels, num_threads

# At most this many rows go to the matrix-vector kernels; more rows amortise a dequantized
# weight in a dense matmul. Speculative decoding keeps its verification batches within it.
SMALL_BATCH = 16
# Matrices up to this size (float32 bytes) dequantize into the reused scratch buffer; a larger
# one (the 545 MB output head, when every position's logits are wanted) gets its own tensor.
_SCRATCH_LIMIT = 64 << 20
_scratch = threading.local()


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


class KernelLinear(nn.Module):
    """Shared dispatch: kernel for few rows on CPU, dequantize + matmul otherwise."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    # The integer kernels walk the input dimension in steps of 64.
    kernel_multiple = 64
    # Batches of up to this many rows run on the kernels; larger ones dequantize + matmul.
    kernel_rows: int | None = SMALL_BATCH

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as a float32 (out_features, in_features) tensor (written to ``out``
        where given and the native kernels run)."""
        raise NotImplementedError

    def _weight_for_matmul(self) -> torch.Tensor:
        """The float weight for a large batch. Prefill dequantizes every matrix per chunk;
        a per-thread scratch buffer reused for all of them keeps the heap from churning
        through tens of MB per matrix (glibc keeps such freed blocks resident)."""
        n = self.out_features * self.in_features
        q = getattr(self, "qweight", None)
        if q is None or q.device.type != "cpu" or n * 4 > _SCRATCH_LIMIT:
            return self.dequantize()
        # One buffer per mode: a tensor made under inference_mode cannot be written outside it.
        name = "inference" if torch.is_inference_mode_enabled() else "plain"
        buf = getattr(_scratch, name, None)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n)
            setattr(_scratch, name, buf)
        return self.dequantize(out=buf[:n].view(self.out_features, self.in_features))

    def _describe(self) -> LinearDesc:
        raise NotImplementedError

    def describe(self) -> LinearDesc:
        """The weights as the kernels' C descriptor (qlm_linear_t); rebuilt when a weight
        tensor was replaced. The module keeps the tensors it points into alive."""
        key = tuple(t.data_ptr() for t in self.buffers(recurse=False))
        cached = getattr(self, "_desc_cache", None)
        if cached is None or cached[0] != key:
            cached = self._desc_cache = (key, self._describe())
        return cached[1]

    def _kernel(self, lib: ctypes.CDLL, x: torch.Tensor, y: torch.Tensor) -> None:
        M, K = x.shape
        xq, xd = _act_scratch(lib, M, K)
        lib.qlm_linear(
            ctypes.byref(self.describe()),
            x.data_ptr(),
            y.data_ptr(),
            M,
            xq.data_ptr(),
            xd.data_ptr(),
            num_threads(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        lib = cpu_kernels() if x.device.type == "cpu" else None
        if (
            lib is not None
            and (self.kernel_rows is None or x2.shape[0] <= self.kernel_rows)
            and self.in_features % self.kernel_multiple == 0
        ):
            x2 = x2.float().contiguous()
            y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
            self._kernel(lib, x2, y)
        else:
            w = self._weight_for_matmul().to(x.dtype)
            y = nn.functional.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def _act_scratch(lib: ctypes.CDLL, M: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for the kernels' int8 copies of the activations: codes, scales and sums (the
    float part's size is the C side's ACT_FLOATS)."""
    return torch.empty(M * K, dtype=torch.int8), torch.empty(lib.qlm_act_floats(M, K))


def linear_desc(
    kind: Kind,
    w: torch.Tensor,
    N: int,
    K: int,
    *,
    scale: torch.Tensor | None = None,
    mins: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    G: int = 0,
) -> LinearDesc:
    """One qlm_linear_t over tensors the caller keeps alive."""
    return LinearDesc(int(kind), w.data_ptr(), _ptr(scale), _ptr(mins), _ptr(bias), N, K, G)


def _cat_bias(mods: list[KernelLinear]) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])


class DenseLinear(KernelLinear):
    """float32 weights, with the kernel's row-order-independent matrix-vector product."""

    kernel_multiple = 1

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseLinear:
        return cls(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())

    @classmethod
    def concat(cls, mods: list[DenseLinear]) -> DenseLinear:
        return cls(torch.cat([m.weight for m in mods]), _cat_bias(mods))

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight

    def _describe(self) -> LinearDesc:
        return linear_desc(
            Kind.F32, self.weight, self.out_features, self.in_features, bias=self.bias
        )


# Rows per group of the kernels' interleaved int8 layout (GG in cpu_kernels.c): each block of
# 32 inputs of TILE_ROWS rows is 8 vectors of 32 bytes, vector v holding bytes 4v .. 4v+3 of
# every row, as GGUF's Q8_0 quants are packed (qwenlm.quant.gguf).
TILE_ROWS = 8


def _tiles(q: torch.Tensor) -> torch.Tensor:
    """Interleaved (N, K) storage as (groups, blocks, vectors, rows, 4 bytes)."""
    N, K = q.shape
    return q.view(N // TILE_ROWS, K // 32, 8, TILE_ROWS, 4)


def untile_int8(q: torch.Tensor) -> torch.Tensor:
    """Interleaved int8 codes back to a plain (N, K) matrix."""
    return _tiles(q).permute(0, 3, 1, 2, 4).reshape(q.shape)


def tiled_rows(q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of interleaved int8 codes, as plain rows (..., K)."""
    rows = _tiles(q)[ids.reshape(-1) // TILE_ROWS, :, :, ids.reshape(-1) % TILE_ROWS]
    return rows.reshape(*ids.shape, q.shape[1])


class Int8Linear(KernelLinear):
    """int8 weights with one float scale per output channel (symmetric, absmax / 127).

    :meth:`tile` rearranges ``qweight`` in memory into the kernels' interleaved layout (8 rows
    per block, as GGUF's Q8_0: one weight read serves every input row of a batch);
    ``state_dict`` and :meth:`weight_codes` still give the plain (out_features, in_features)
    codes.
    """

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.tiled = False
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    @property
    def kernel_rows(self) -> int | None:  # type: ignore[override]
        # Tiled, every batch runs on the integer kernels: one pass over a weight block serves
        # 16 rows, which measured 1.5x faster than dequantize + float32 matmul for 256-512-row
        # prefill chunks and 2x for 64 (EPYC Zen 3, 2 threads), and keeps a row's numbers
        # the same whatever batch it is in.
        return None if self.tiled else SMALL_BATCH

    def tile(self) -> Int8Linear:
        """Switch ``qweight`` to the interleaved layout where the shape allows it (in place)."""
        N, K = self.out_features, self.in_features
        if self.tiled or N % TILE_ROWS or K % 64 or self.qweight.device.type != "cpu":
            return self
        # A group's permutation stays inside its own TILE_ROWS rows, so the matrix is rewritten
        # in place a band of groups at a time: no second copy of a 136 MB output head.
        rows = self.qweight.view(N // TILE_ROWS, TILE_ROWS, K // 32, 8, 4)
        out = _tiles(self.qweight)
        band = max(1, (4 << 20) // (TILE_ROWS * K))
        for a in range(0, N // TILE_ROWS, band):
            out[a : a + band] = rows[a : a + band].permute(0, 2, 3, 1, 4).clone()
        self.tiled = True
        return self

    def weight_codes(self) -> torch.Tensor:
        """The int8 codes as a plain (out_features, in_features) matrix."""
        return untile_int8(self.qweight) if self.tiled else self.qweight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            destination[prefix + "qweight"] = self.weight_codes().contiguous()

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scale

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        q, scale = cls.quantize(weight)
        return cls(q, scale, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_float(
            linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        )

    @classmethod
    def concat(cls, mods: list[Int8Linear]) -> Int8Linear:
        return cls(
            torch.cat([m.weight_codes() for m in mods]),
            torch.cat([m.scale for m in mods]),
            _cat_bias(mods),
        )

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        lib = cpu_kernels() if self.qweight.device.type == "cpu" else None
        if lib is None:
            return self.weight_codes().float() * self.scale[:, None]
        if out is None:
            out = torch.empty(self.out_features, self.in_features)
        lib.qlm_dequant_i8(
            self.qweight.data_ptr(),
            int(self.tiled),
            self.scale.data_ptr(),
            out.data_ptr(),
            self.out_features,
            self.in_features,
            num_threads(),
        )
        return out

    def _describe(self) -> LinearDesc:
        kind = Kind.I8_TILED if self.tiled else Kind.I8
        return linear_desc(
            kind,
            self.qweight,
            self.out_features,
            self.in_features,
            scale=self.scale,
            bias=self.bias,
        )


def _interleave(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (N, K) into bytes (N, K/2): in each 64, byte j = q[j] | q[j+32] << 4."""
    N, K = q.shape
    q = q.view(N, K // 64, 2, 32).to(torch.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, K // 2)


def _deinterleave(packed: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    p = packed.view(N, half // 32, 32)
    return torch.stack((p & 0xF, p >> 4), dim=2).reshape(N, half * 2)


class Int4Linear(KernelLinear):
    """4-bit weights in groups along the input dimension, each group with a scale and a minimum.

    w = q * scale + min with q in 0..15 (asymmetric, like GGUF's Q4_1); scales and minimums are
    stored as float16, so a group of 32 costs 4 + 1 bits per weight.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
    ) -> None:
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("mins", mins.to(torch.float16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    @staticmethod
    def quantize(
        weight: torch.Tensor, group_size: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, K = weight.shape
        if group_size not in (32, 64, 128) or K % group_size or K % 64:
            raise ValueError(
                f"in_features {K} must be a multiple of 64 and of the group size {group_size} "
                "(32, 64 or 128)"
            )
        w = weight.float().view(N, K // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        # Round the group parameters to float16 first, so the codes are chosen for the stored
        # values.
        mins = lo.to(torch.float16)
        scales = ((hi - mins.float()) / 15).clamp(min=1e-8).to(torch.float16)
        q = torch.round((w - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15)
        return _interleave(q.view(N, K)), scales, mins

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32
    ) -> Int4Linear:
        q, scales, mins = cls.quantize(weight, group_size)
        return cls(q, scales, mins, bias, group_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        return cls.from_float(
            linear.weight.detach(),
            None if linear.bias is None else linear.bias.detach(),
            group_size,
        )

    @classmethod
    def concat(cls, mods: list[Int4Linear]) -> Int4Linear:
        return cls(
            torch.cat([m.qweight for m in mods]),
            torch.cat([m.scales for m in mods]),
            torch.cat([m.mins for m in mods]),
            _cat_bias(mods),
            mods[0].group_size,
        )

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        lib = cpu_kernels() if self.qweight.device.type == "cpu" else None
        N, K, G = self.out_features, self.in_features, self.group_size
        if lib is None:
            q = _deinterleave(self.qweight).float().view(N, K // G, G)
            return (q * self.scales.float()[..., None] + self.mins.float()[..., None]).view(N, K)
        if out is None:
            out = torch.empty(N, K)
        lib.qlm_dequant_i4(
            self.qweight.data_ptr(),
            self.scales.data_ptr(),
            self.mins.data_ptr(),
            out.data_ptr(),
            N,
            K,
            G,
            num_threads(),
        )
        return out

    def _describe(self) -> LinearDesc:
        return linear_desc(
            Kind.I4,
            self.qweight,
            self.out_features,
            self.in_features,
            scale=self.scales,
            mins=self.mins,
            bias=self.bias,
            G=self.group_size,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
