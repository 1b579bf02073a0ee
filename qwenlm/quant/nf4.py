"""NF4 (4-bit NormalFloat) weights, the frozen base of Q-LoRA.

QLoRA's NF4 codebook holds 16 values at the quantiles of a standard normal distribution scaled
to [-1, 1], with an exact zero. A weight matrix is cut into blocks of ``block_size`` values;
each block is divided by its largest magnitude (its absmax) and every value is replaced by the
index of the nearest code, two indices per byte. Double quantization stores the absmax scales
themselves as int8 in blocks of 256 around their mean (bitsandbytes uses an 8-bit float code for
that second step; linear int8 is simpler and its error is far below NF4's own).

``NF4Linear`` dequantizes on every call and multiplies in the activation dtype: slower than a
fused kernel, but exact to the codebook, and autograd flows through the input for LoRA training
while the 4-bit weights stay frozen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qwenlm.errors import CheckpointError
from qwenlm.models import swap_module

# QLoRA's NormalFloat4 codebook (Dettmers et al. 2023, appendix E), ascending.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
SCALE_BLOCK = 256  # absmax values per block in double quantization


def _code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 of numel/2 bytes, float32 absmax per block) for a tensor of any shape."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    flat = w.detach().float().reshape(-1)
    if flat.numel() % block_size:
        raise ValueError(f"{flat.numel()} values do not split into blocks of {block_size}")
    blocks = flat.view(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = _code(flat.device)
    # Nearest code = bucket between consecutive midpoints.
    idx = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8).reshape(-1)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """The float32 values (flat) of :func:`quantize_nf4`'s output."""
    idx = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1).long()
    values = _code(packed.device)[idx].view(-1, block_size)  # (n_blocks, block_size)
    return (values * absmax[:, None]).reshape(-1)


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (int8 codes, float32 scale per 256 codes, float32 mean)."""
    mean = absmax.mean()
    centred = absmax - mean
    pad = (-centred.numel()) % SCALE_BLOCK
    blocks = F.pad(centred, (0, pad)).view(-1, SCALE_BLOCK)
    scale = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1)[: absmax.numel()], scale, mean


def dequantize_scales(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    pad = (-q.numel()) % SCALE_BLOCK
    blocks = F.pad(q.float(), (0, pad)).view(-1, SCALE_BLOCK) * scale[:, None]
    return blocks.reshape(-1)[: q.numel()] + mean


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored as NF4 with blockwise absmax scales.

    The state (``state_dict()``, or :meth:`save` / :meth:`load` in safetensors) is
    self-describing: a small int64 ``meta`` buffer holds (out_features, in_features,
    block_size, double_quant).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        block_size: int = 64,
        double_quant: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.double_quant = double_quant
        n = in_features * out_features
        if n % block_size:
            raise ValueError(
                f"{out_features}x{in_features} weights do not split into blocks of {block_size}"
            )
        n_blocks = n // block_size
        self.register_buffer("weight_nf4", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(n_blocks, dtype=torch.int8, device=device))
            n_scales = -(-n_blocks // SCALE_BLOCK)
            self.register_buffer("absmax_scale", torch.zeros(n_scales, device=device))
            self.register_buffer("absmax_mean", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
        self.register_buffer(
            "meta",
            torch.tensor([out_features, in_features, block_size, int(double_quant)], device=device),
        )
        # The bias stays in floating point; it is frozen like the weight.
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.compute_dtype = dtype

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, block_size: int = 64, *, double_quant: bool = False
    ) -> NF4Linear:
        """Quantize ``linear``'s weight; the bias is copied."""
        w = linear.weight
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            double_quant=double_quant,
            dtype=w.dtype,
            device=w.device,
        )
        packed, absmax = quantize_nf4(w, block_size)
        q.weight_nf4.copy_(packed)
        if double_quant:
            codes, scale, mean = quantize_scales(absmax)
            q.absmax_q.copy_(codes)
            q.absmax_scale.copy_(scale)
            q.absmax_mean.copy_(mean)
        else:
            q.absmax.copy_(absmax)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def scales(self) -> torch.Tensor:
        if self.double_quant:
            return dequantize_scales(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def dequantize(self) -> torch.Tensor:
        """The weight as a float32 (out_features, in_features) tensor."""
        flat = dequantize_nf4(self.weight_nf4, self.scales(), self.block_size)
        return flat.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}"
        )

    # -- persistence ------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> NF4Linear:
        """Rebuild from :meth:`state_dict` output (or a file written by :meth:`save`)."""
        if "meta" not in state or state["meta"].numel() != 4:
            raise CheckpointError("NF4 state has no valid 'meta' tensor")
        out_f, in_f, block, dq = (int(v) for v in state["meta"].tolist())
        bias = state.get("bias")
        m = cls(
            in_f,
            out_f,
            bias=bias is not None,
            block_size=block,
            double_quant=bool(dq),
            dtype=bias.dtype if bias is not None else torch.float32,
        )
        expected = m.state_dict()
        if set(state) != set(expected):
            raise CheckpointError(
                f"NF4 state has tensors {sorted(state)}, expected {sorted(expected)}"
            )
        for name, t in state.items():
            if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
                raise CheckpointError(
                    f"NF4 tensor {name} is {t.dtype} {list(t.shape)}, expected "
                    f"{expected[name].dtype} {list(expected[name].shape)}"
                )
        m.load_state_dict(state)
        return m

    def save(self, path: str | os.PathLike[str]) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NF4Linear:
        try:
            state = load_file(str(Path(path)))
        except Exception as e:  # the Rust reader raises its own error types
            raise CheckpointError(f"cannot read NF4 weights {path}: {e}") from None
        return cls.from_state_dict(state)


def quantize_model_nf4(
    model: nn.Module,
    *,
    skip: Iterable[str] = ("lm_head",),
    block_size: int = 64,
    double_quant: bool = False,
) -> list[str]:
    """Swap every ``nn.Linear`` (except those whose name ends with an entry of ``skip``) for an
    ``NF4Linear``, in place; returns the names swapped."""
    skip = tuple(skip)
    names = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(name.split(".")[-1] == s for s in skip)
    ]
    for name in names:
        linear = model.get_submodule(name)
        swap_module(
            model, name, NF4Linear.from_linear(linear, block_size, double_quant=double_quant)
        )
    return names
