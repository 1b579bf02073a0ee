"""The decode fast path: each decoder layer as ten native calls instead of ~60 PyTorch ops.

For a one-token step the arithmetic is small and the dispatch of many tiny PyTorch ops costs
as much as reading the weights. :func:`accelerate` wraps each decoder layer of an engine's
model in a :class:`KernelLayer` that, for decode-sized batches, runs norm, projections,
rotary embedding, attention and SwiGLU as native kernels on preallocated buffers. Larger
batches (prefill) go through the layer's own PyTorch forward, which defines the maths; tests
hold the two to the same results.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenlm.kernels import cpu_kernels, num_threads
from qwenlm.quant.linear import SMALL_BATCH, KernelLinear


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

    @staticmethod
    def supported(layer: nn.Module) -> bool:
        attn, mlp = layer.self_attn, layer.mlp
        return all(
            isinstance(getattr(m, name, None), KernelLinear)
            for m, name in (
                (attn, "qkv_proj"),
                (attn, "o_proj"),
                (mlp, "gate_up_proj"),
                (mlp, "down_proj"),
            )
        )

    def forward(self, x, cos, sin, mask, cache):
        lib = cpu_kernels()
        rows = x.shape[0] * x.shape[1]
        if (
            lib is None
            or x.device.type != "cpu"
            or rows > SMALL_BATCH
            or mask is not None
            or not hasattr(cache, "layout")
            or x.dtype != torch.float32
        ):
            return self.layer(x, cos, sin, mask, cache)
        L, attn, mlp = self.layer, self.layer.self_attn, self.layer.mlp
        H, Hkv, D = self.H, self.Hkv, self.D
        d_model = x.shape[-1]
        h = x.reshape(rows, d_model).contiguous().clone()  # residual stream, updated in place
        y = torch.empty_like(h)
        lib.qlm_add_rmsnorm(
            h.data_ptr(),
            None,
            L.input_layernorm.weight.data_ptr(),
            y.data_ptr(),
            rows,
            d_model,
            self.eps,
        )
        qkv = attn.qkv_proj(y)  # (rows, (H + 2 Hkv) D)
        c = cos.reshape(rows, D).float().contiguous()
        s = sin.reshape(rows, D).float().contiguous()
        stride = (H + 2 * Hkv) * D
        lib.qlm_rope(qkv.data_ptr(), rows, stride, H, D, c.data_ptr(), s.data_ptr())
        lib.qlm_rope(qkv.data_ptr() + H * D * 4, rows, stride, Hkv, D, c.data_ptr(), s.data_ptr())
        out = torch.empty(rows, H * D)
        threads = num_threads()
        for seq, start, T in cache.layout:
            kc, i = seq.cache, cache.layer
            scratch = torch.empty(threads * (kc.length + T))
            rows_in = qkv.data_ptr() + start * stride * 4
            rows_out = out.data_ptr() + start * H * D * 4
            kv = [kc.keys[i].data_ptr(), kc.values[i].data_ptr()]
            if kc.quantized:
                kv += [kc.key_scales[i].data_ptr(), kc.value_scales[i].data_ptr()]
            attend = lib.qlm_attend_rows_q8 if kc.quantized else lib.qlm_attend_rows
            attend(
                rows_in, T, H, Hkv, D, *kv, kc.capacity, kc.length, self.scale,
                rows_out, scratch.data_ptr(), threads,
            )  # fmt: skip
        o = attn.o_proj(out)
        lib.qlm_add_rmsnorm(
            h.data_ptr(),
            o.data_ptr(),
            L.post_attention_layernorm.weight.data_ptr(),
            y.data_ptr(),
            rows,
            d_model,
            self.eps,
        )
        gu = mlp.gate_up_proj(y)
        F = gu.shape[-1] // 2
        act = torch.empty(rows, F)
        lib.qlm_silu_mul(gu.data_ptr(), act.data_ptr(), rows, F)
        h += mlp.down_proj(act)
        return h.view(x.shape)


def accelerate(model: nn.Module) -> bool:
    """Wrap every supported decoder layer in a KernelLayer; returns whether all were."""
    layers = model.model.layers
    if cpu_kernels() is None or not all(KernelLayer.supported(layer) for layer in layers):
        return False
    for i, layer in enumerate(layers):
        if not isinstance(layer, KernelLayer):
            layers[i] = KernelLayer(layer)
    return True
