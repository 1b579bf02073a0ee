"""The decode fast path: each decoder layer as one native call instead of ~60 PyTorch ops.

For a one-token step the arithmetic is small and the dispatch of many tiny PyTorch ops costs
as much as reading the weights. :func:`accelerate` wraps each decoder layer of an engine's
model in a :class:`KernelLayer` that, for decode-sized batches, runs norm, projections,
rotary embedding, attention and SwiGLU in one call of ``qlm_layer_forward`` (one job on the
kernels' thread pool per layer) on preallocated buffers, and tiles the int8 weights for the
kernels. Any :class:`~qwenlm.quant.linear.KernelLinear` (float32, int8, int4, GGUF formats)
describes itself to the C side with ``describe()``.
Larger batches (prefill) go through the layer's own PyTorch forward, which defines the
maths; tests hold the two to the same results.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from qwenlm.generation.engine import BatchLayer
from qwenlm.kernels import LayerDesc, SegmentDesc, cpu_kernels, move_to_huge_pages, num_threads
from qwenlm.models.attention import AttentionPlan, LayerCache
from qwenlm.quant.linear import SMALL_BATCH, Int8Linear, KernelLinear


def _base(m: nn.Module) -> nn.Module:
    """The linear layer under a wrapper that adds to its output (lora.AdapterLinear): the
    native layer computes the base; rows with adapters never take this path."""
    return getattr(m, "base_layer", m)


class KernelLayer(nn.Module):
    """A decoder layer whose small batches run on the native kernels.

    Needs fused, kernel-backed projections (``qkv_proj``, ``gate_up_proj`` as
    :class:`~qwenlm.quant.linear.KernelLinear`) and the engine's ragged-batch cache.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        attn = layer.self_attn
        self.H, self.Hkv, self.D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.scale = self.D**-0.5
        self.eps = float(layer.input_layernorm.eps)
        self._desc: tuple | None = None

    @staticmethod
    def supported(layer: nn.Module) -> bool:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "q_norm", None) is not None:
            return False  # the native layer has no step for Qwen3's q/k norms
        mods = (
            [_base(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if all(hasattr(m, n) for m, n in ((attn, "qkv_proj"), (mlp, "gate_up_proj")))
            else []
        )
        return bool(mods) and all(
            isinstance(m, KernelLinear) and m.in_features % m.kernel_multiple == 0 for m in mods
        )

    def _descriptor(self) -> LayerDesc | None:
        """The layer's weights as the C struct (None if they are not on the CPU); rebuilt
        when a weight tensor was replaced."""
        L, attn, mlp = self.layer, self.layer.self_attn, self.layer.mlp
        mods = tuple(
            _base(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        )
        main = [m.qweight if hasattr(m, "qweight") else m.weight for m in mods]
        main += [L.input_layernorm.weight, L.post_attention_layernorm.weight]
        key = tuple(t.data_ptr() for t in main)
        if self._desc is None or self._desc[0] != key:
            tensors = [t for m in mods for t in m.buffers()] + main
            if not all(t.device.type == "cpu" for t in tensors):
                return None
            parts = [m.describe() for m in mods]
            desc = LayerDesc(
                *parts,
                main[-2].data_ptr(),
                main[-1].data_ptr(),
                self.H,
                self.Hkv,
                self.D,
                self.eps,
                self.scale,
            )
            # The tensors (and the parts a fused projection chains to) stay referenced.
            self._desc = (key, desc, tensors, parts)
        return self._desc[1]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: LayerCache,
    ) -> torch.Tensor:
        lib = cpu_kernels()
        rows = x.shape[0] * x.shape[1]
        if (
            lib is None
            or x.device.type != "cpu"
            or rows > SMALL_BATCH
            or not plan.ordinary
            or not isinstance(cache, BatchLayer)
            or not cache.native
            or x.dtype != torch.float32
            or cos.dtype != torch.float32
            or (desc := self._descriptor()) is None
        ):
            return self.layer(x, cos, sin, plan, cache)
        H, D = self.H, self.D
        d_model = x.shape[-1]
        h = x.reshape(rows, d_model).clone()  # residual stream, updated in place
        c = cos.reshape(rows, D).contiguous()
        s = sin.reshape(rows, D).contiguous()
        layout = cache.layout
        segs = (SegmentDesc * len(layout))()
        quantized = False
        longest = 0
        for j, (seq, start, T) in enumerate(layout):
            kc, i = seq.cache, cache.layer
            quantized = kc.quantized
            longest = max(longest, kc.length + T)
            scales = (
                (kc.key_scales[i].data_ptr(), kc.value_scales[i].data_ptr())
                if quantized
                else (None, None)
            )
            segs[j] = SegmentDesc(
                start,
                T,
                kc.capacity,
                kc.length,
                kc.keys[i].data_ptr(),
                kc.values[i].data_ptr(),
                *scales,
            )
        F = desc.down.K
        kmax = max(d_model, F, H * D)
        threads = num_threads()
        qkv_width = self.layer.self_attn.qkv_proj.out_features
        work = torch.empty(
            rows * (3 * d_model + qkv_width + 2 * H * D + 3 * F)
            + 4 * rows * (kmax // 32)
            + threads * longest
        )
        xq = torch.empty(rows * kmax, dtype=torch.int8)
        lib.qlm_layer_forward(
            ctypes.byref(desc), h.data_ptr(), rows, c.data_ptr(), s.data_ptr(), segs,
            len(layout), int(quantized), work.data_ptr(), xq.data_ptr(), threads,
        )  # fmt: skip
        return h.view(x.shape)


def accelerate(model: nn.Module) -> bool:
    """Wrap every supported decoder layer in a KernelLayer, tile the int8 weights and move
    the kernels' weights into huge pages; returns whether all layers were wrapped."""
    layers = model.model.layers
    if cpu_kernels() is None or not all(KernelLayer.supported(layer) for layer in layers):
        return False
    kernel_linears = [m for m in model.modules() if isinstance(m, KernelLinear)]
    for m in kernel_linears:
        if isinstance(m, Int8Linear):
            m.tile()
    move_to_huge_pages(t for m in kernel_linears for t in m.buffers(recurse=False))
    for i, layer in enumerate(layers):
        if not isinstance(layer, KernelLayer):
            layers[i] = KernelLayer(layer)
    return True
