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


def _native_lib(x: torch.Tensor, cos: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, if a step on hidden states ``x`` (B, T, hidden) can run natively: float32
    on the CPU, a decode-sized number of rows."""
    lib = cpu_kernels()
    if (
        lib is None
        or x.device.type != "cpu"
        or x.shape[0] * x.shape[1] > SMALL_BATCH
        or x.dtype != torch.float32
        or cos.dtype != torch.float32
    ):
        return None
    return lib


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
        when a weight tensor was replaced or moved (a LoRA merge, huge pages)."""
        watch = self._desc[3] if self._desc is not None else None
        # The check runs once per layer per step: dict lookups and data_ptr, no module
        # attribute access (nn.Module.__getattr__ made this check a tenth of a decode step).
        if watch is not None and all(d.get(k) is t and t.data_ptr() == p for d, k, t, p in watch):
            return self._desc[0]
        L, attn, mlp = self.layer, self.layer.self_attn, self.layer.mlp
        mods = tuple(
            _base(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        )
        named = [(m, "qweight" if "qweight" in m._buffers else "weight") for m in mods]
        named += [(L.input_layernorm, "weight"), (L.post_attention_layernorm, "weight")]
        tensors = [t for m in mods for t in m.buffers()] + [getattr(m, k) for m, k in named]
        if not all(t.device.type == "cpu" for t in tensors):
            self._desc = None
            return None
        parts = [m.describe() for m in mods]
        desc = LayerDesc(
            *parts,
            named[-2][0].weight.data_ptr(),
            named[-1][0].weight.data_ptr(),
            self.H,
            self.Hkv,
            self.D,
            self.eps,
            self.scale,
        )
        watch = []
        for m, k in named:
            d = m._buffers if k in m._buffers else m._parameters
            watch.append((d, k, d[k], d[k].data_ptr()))
        # The tensors (and the parts a fused projection chains to) stay referenced.
        self._desc = (desc, tensors, parts, watch)
        return desc

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: LayerCache,
    ) -> torch.Tensor:
        lib = _native_lib(x, cos)
        rows = x.shape[0] * x.shape[1]
        if (
            lib is None
            or not plan.ordinary
            or not isinstance(cache, BatchLayer)
            or not cache.native
            or (desc := self._descriptor()) is None
        ):
            return self.layer(x, cos, sin, plan, cache)
        step = _Step.get(cache.layout, cos, sin, rows, self, desc)
        h = x.reshape(rows, x.shape[-1]).clone()  # residual stream, updated in place
        step.point_at(cache.layer)
        lib.qlm_layer_forward(
            ctypes.byref(desc), h.data_ptr(), rows, step.cos_ptr, step.sin_ptr, step.segs,
            step.nseg, step.quantized, step.work_ptr, step.xq_ptr, step.threads,
        )  # fmt: skip
        if step.caches and cache.layer == len(step.caches[0].keys) - 1:
            _Step._last = None  # the step is over: do not keep its sequences' caches alive
        return h.view(x.shape)


class _Step:
    """What every layer of one decode step shares: the segments, rotary rows and scratch.

    Built by the first layer of a step and reused by the others (the engine gives all layers
    one ``layout`` list per forward); only the cache pointers change from layer to layer.
    """

    _last: _Step | None = None

    def __init__(self, layout: list, cos: torch.Tensor, sin: torch.Tensor, rows: int,
                 layer: KernelLayer, desc: LayerDesc) -> None:  # fmt: skip
        self.layout, self.cos_in, self.sin_in = layout, cos, sin
        D = layer.D
        self.c = cos.reshape(rows, D).contiguous()
        self.s = sin.reshape(rows, D).contiguous()
        self.cos_ptr, self.sin_ptr = self.c.data_ptr(), self.s.data_ptr()
        self.caches = [seq.cache for seq, _, _ in layout]
        self.quantized = int(bool(self.caches) and self.caches[-1].quantized)
        self.nseg = len(layout)
        self.segs = (SegmentDesc * len(layout))()
        longest = 0
        for j, (seq, start, T) in enumerate(layout):
            kc = seq.cache
            longest = max(longest, kc.length + T)
            self.segs[j] = SegmentDesc(start, T, kc.capacity, kc.length, None, None, None, None)
        d_model = desc.o.N
        F = desc.down.K
        H, Dh = layer.H, layer.D
        kmax = max(d_model, F, H * Dh)
        self.threads = num_threads()
        qkv_width = layer.layer.self_attn.qkv_proj.out_features
        self.work = torch.empty(
            rows * (3 * d_model + qkv_width + 2 * H * Dh + 3 * F)
            + 4 * rows * (kmax // 32)
            + self.threads * (desc.H // desc.Hkv) * longest  # attention: a KV head's scores
        )
        self.xq = torch.empty(rows * kmax, dtype=torch.int8)
        self.work_ptr, self.xq_ptr = self.work.data_ptr(), self.xq.data_ptr()
        self.shape = (rows, d_model, F, H, Dh, qkv_width)

    @classmethod
    def get(cls, layout: list, cos: torch.Tensor, sin: torch.Tensor, rows: int,
            layer: KernelLayer, desc: LayerDesc) -> _Step:  # fmt: skip
        last = cls._last
        if (
            last is not None
            and last.layout is layout
            and last.cos_in is cos
            and last.sin_in is sin
            and last.shape == (rows, desc.o.N, desc.down.K, layer.H, layer.D,
                               layer.layer.self_attn.qkv_proj.out_features)
        ):  # fmt: skip
            return last
        cls._last = step = cls(layout, cos, sin, rows, layer, desc)
        return step

    def all_layers(self, n: int) -> ctypes.Array:
        """The segments of layers 0 .. n-1, one after the other (for ``qlm_stack_forward``)."""
        segs = (SegmentDesc * (n * self.nseg))()
        for i in range(n):
            for j, (seg, kc) in enumerate(zip(self.segs, self.caches, strict=True)):
                s = segs[i * self.nseg + j]
                s.start, s.T, s.cap, s.past = seg.start, seg.T, seg.cap, seg.past
                s.K, s.V = kc.keys[i].data_ptr(), kc.values[i].data_ptr()
                if self.quantized:
                    s.Ks, s.Vs = kc.key_scales[i].data_ptr(), kc.value_scales[i].data_ptr()
        return segs

    def point_at(self, i: int) -> None:
        """Aim the segments at layer ``i``'s keys and values."""
        for seg, kc in zip(self.segs, self.caches, strict=True):
            seg.K = kc.keys[i].data_ptr()
            seg.V = kc.values[i].data_ptr()
            if self.quantized:
                seg.Ks = kc.key_scales[i].data_ptr()
                seg.Vs = kc.value_scales[i].data_ptr()


class KernelStack(nn.ModuleList):
    """The decoder layers, able to run a whole decode step in one native call.

    ``Qwen2Model.forward`` asks ``run_all`` first; it answers None (and the layers run one
    by one) unless every layer would take its native path anyway. One call instead of one
    per layer saves the per-layer Python round trip (~0.1 ms a layer, a tenth of a 0.5B
    model's step on 2 cores); the arithmetic is the same calls in the same order.
    """

    _pointers: tuple | None = None

    def run_all(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plans: list[AttentionPlan],
        cache: list[LayerCache],
    ) -> torch.Tensor | None:
        lib = _native_lib(x, cos)
        rows = x.shape[0] * x.shape[1]
        if lib is None or len(cache) != len(self):
            return None
        first = cache[0]
        if not isinstance(first, BatchLayer) or not first.native:
            return None
        layout = first.layout
        for i, (layer, plan, c) in enumerate(zip(self, plans, cache, strict=True)):
            if (
                not isinstance(layer, KernelLayer)
                or not plan.ordinary
                or not isinstance(c, BatchLayer)
                or c.layout is not layout
                or c.layer != i
                or not c.native
            ):
                return None
        descs = [layer._descriptor() for layer in self]
        if any(d is None for d in descs):
            return None
        key = tuple(map(id, descs))
        if self._pointers is None or self._pointers[0] != key:
            shape = (descs[0].o.N, descs[0].down.K, descs[0].qkv.N)
            if any(shape != (d.o.N, d.down.K, d.qkv.N) for d in descs):
                return None  # one scratch layout serves all layers
            ptrs = (ctypes.POINTER(LayerDesc) * len(descs))(*map(ctypes.pointer, descs))
            self._pointers = (key, ptrs)
        step = _Step(layout, cos, sin, rows, self[0], descs[0])  # one call: nothing to share
        h = x.reshape(rows, x.shape[-1]).clone()  # residual stream, updated in place
        lib.qlm_stack_forward(
            self._pointers[1], len(descs), h.data_ptr(), rows, step.cos_ptr, step.sin_ptr,
            step.all_layers(len(descs)), step.nseg, step.quantized, step.work_ptr,
            step.xq_ptr, step.threads,
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
    model.model.layers = KernelStack(
        layer if isinstance(layer, KernelLayer) else KernelLayer(layer) for layer in layers
    )
    return True
