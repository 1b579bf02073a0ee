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
import operator
import threading
import weakref

import torch
from torch import nn

from qwenlm.generation.cache import SequenceCache
from qwenlm.generation.engine import BatchLayer
from qwenlm.kernels import (
    Kind,
    LayerDesc,
    LinearDesc,
    SegmentDesc,
    cpu_kernels,
    decode_threads,
    move_to_huge_pages,
    num_threads,
)
from qwenlm.models.attention import AttentionPlan, LayerCache, make_plans
from qwenlm.models.qwen2 import RMSNorm
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
        step = _Step.get(lib, cache.layout, cos, sin, rows, self, desc)
        h = x.reshape(rows, x.shape[-1]).clone()  # residual stream, updated in place
        step.point_at(cache.layer)
        lib.qlm_layer_forward(
            ctypes.byref(desc), h.data_ptr(), rows, step.cos_ptr, step.sin_ptr, step.segs,
            step.nseg, step.kv_type, step.work_ptr, step.xq_ptr, step.threads,
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

    def __init__(self, lib: ctypes.CDLL, layout: list, cos: torch.Tensor, sin: torch.Tensor,
                 rows: int, layer: KernelLayer, desc: LayerDesc) -> None:  # fmt: skip
        self.layout, self.cos_in, self.sin_in = layout, cos, sin
        D = layer.D
        self.c = cos.reshape(rows, D).contiguous()
        self.s = sin.reshape(rows, D).contiguous()
        self.cos_ptr, self.sin_ptr = self.c.data_ptr(), self.s.data_ptr()
        self.caches = [seq.cache for seq, _, _ in layout]
        self.kv_type = self.caches[-1].kv_type if self.caches else 0
        self.quantized = bool(self.caches) and self.caches[-1].quantized
        self.nseg = len(layout)
        self.segs, longest = _segments(layout)
        d_model = desc.o.N
        F = desc.down.K
        H, Dh = layer.H, layer.D
        qkv_width = layer.layer.self_attn.qkv_proj.out_features
        self.work, self.xq, self.threads = _scratch(lib, layer, desc, rows, longest)
        self.work_ptr, self.xq_ptr = self.work.data_ptr(), self.xq.data_ptr()
        self.shape = (rows, d_model, F, H, Dh, qkv_width)

    @classmethod
    def get(cls, lib: ctypes.CDLL, layout: list, cos: torch.Tensor, sin: torch.Tensor,
            rows: int, layer: KernelLayer, desc: LayerDesc) -> _Step:  # fmt: skip
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
        cls._last = step = cls(lib, layout, cos, sin, rows, layer, desc)
        return step

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
        h = x.reshape(rows, x.shape[-1]).clone()  # residual stream, updated in place
        cos2, sin2 = cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous()
        if not self.run(h, cos2, sin2, layout):
            return None
        return h.view(x.shape)

    def layer_pointers(self) -> ctypes.Array | None:
        """Every layer's descriptor, as the C array of pointers (None if a layer's weights
        are not on the CPU, or the layers differ in shape)."""
        cached = self._pointers
        # Every watched tensor (see KernelLayer._descriptor) still in place, checked by maps
        # over flat lists: a Python loop over ~150 tensors cost 0.2 ms of a cold-cache step.
        if cached is not None:
            ptrs, dicts, keys, tensors, addrs = cached
            if (
                all(map(operator.is_, map(dict.get, dicts, keys), tensors))
                and list(map(torch.Tensor.data_ptr, tensors)) == addrs
            ):
                return ptrs
        if not all(isinstance(layer, KernelLayer) for layer in self):
            return None
        descs = [layer._descriptor() for layer in self]
        if any(d is None for d in descs):
            return None
        shape = (descs[0].o.N, descs[0].down.K, descs[0].qkv.N)
        if any(shape != (d.o.N, d.down.K, d.qkv.N) for d in descs):
            return None  # one scratch layout serves all layers
        ptrs = (ctypes.POINTER(LayerDesc) * len(descs))(*map(ctypes.pointer, descs))
        watch = [w for layer in self for w in layer._desc[3]]
        self._pointers = (ptrs, *map(list, zip(*watch, strict=True)))
        return ptrs

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: list) -> bool:
        """Every layer over ``h`` (rows, hidden; updated in place) with rotary rows ``cos``,
        ``sin`` (rows, head_dim), in one native call. False (nothing done) where the native
        layers cannot run."""
        lib = cpu_kernels()
        ptrs = self.layer_pointers()
        if lib is None or ptrs is None or len(layout) > MAX_SEGMENTS:
            return False
        first = self[0]
        rows = h.shape[0]
        caches = [seq.cache for seq, _, _ in layout]
        segs, longest = _segments(layout)
        kv = (ctypes.c_void_p * len(caches))(*map(_layer_caches, caches))
        work, xq, threads = _scratch(lib, first, first._desc[0], rows, longest)
        lib.qlm_stack_forward(
            ptrs, len(ptrs), h.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), segs, kv,
            len(layout), caches[-1].kv_type, work.data_ptr(), xq.data_ptr(), threads,
            None, 0.0, None, None, 0, None, None,
        )  # fmt: skip
        return True


def _segments(layout: list) -> tuple[ctypes.Array, int]:
    """The batch's segments (rows and cache state; no cache pointers yet) and the longest
    sequence after this step."""
    segs = (SegmentDesc * len(layout))()
    longest = 0
    for j, (seq, start, T) in enumerate(layout):
        kc = seq.cache
        longest = max(longest, kc.length + T)
        segs[j] = SegmentDesc(start, T, kc.capacity, kc.length, None, None, None, None)
    return segs, longest


# The C side's bound on segments per call (one per sequence; batches stay within SMALL_BATCH).
MAX_SEGMENTS = 64
# Rows per native call of a longer prefill piece (NativeForward.logits): past 8 rows the
# kernels are compute-bound, so more rows a call save little (32-512 measured alike within
# the host's noise), and the scratch kept between calls (~80 KB a row for the 0.5B, ~20 MB
# for 64 rows of the 7B) stays small.
PIECE_ROWS = 64
_LAYER_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_caches(kc: SequenceCache) -> int:
    """The address of a C array of one sequence's caches, a segment per layer (only the key
    and value pointers set); rebuilt when the cache's buffers move (``reserve``)."""
    key = (kc.capacity, kc.keys[0].data_ptr())
    cached = _LAYER_CACHES.get(kc)
    if cached is None or cached[0] != key:
        arr = (SegmentDesc * len(kc.keys))()
        for i, s in enumerate(arr):
            s.K, s.V = kc.keys[i].data_ptr(), kc.values[i].data_ptr()
            if kc.quantized:
                s.Ks, s.Vs = kc.key_scales[i].data_ptr(), kc.value_scales[i].data_ptr()
        cached = _LAYER_CACHES[kc] = (key, arr, ctypes.addressof(arr))
    return cached[2]


_SCRATCH = threading.local()


def _scratch(
    lib: ctypes.CDLL, layer: KernelLayer, desc: LayerDesc, rows: int, longest: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float and int8 scratch for a native call of ``rows`` rows over caches of up to
    ``longest`` positions, and the thread count; reused from call to call (one thread uses
    one at a time: the kernels' pool runs one job at a time). The scratch has room for all
    threads; the step may use fewer (kernels.ThreadGovernor)."""
    threads = num_threads()
    d, F, H, Dh = desc.o.N, desc.down.K, layer.H, layer.D
    qkv_width = linear_width(desc.qkv)
    kmax = max(d, F, H * Dh)
    floats = (
        rows * (3 * d + qkv_width + 2 * H * Dh + 3 * F)
        + lib.qlm_act_floats(rows, kmax)  # the activations' int8 copies (ACT_FLOATS)
        + threads * (desc.H // desc.Hkv) * longest  # attention: a KV head's scores
    )
    work, xq = getattr(_SCRATCH, "bufs", (None, None))
    if work is None or work.numel() < floats or xq.numel() < rows * kmax:
        # Room for a few hundred more positions and a full small batch: no regrowth per step.
        grow = threads * (desc.H // desc.Hkv) * 512
        work = torch.empty(max(floats + grow, 0 if work is None else work.numel()))
        xq = torch.empty(max(SMALL_BATCH * kmax, rows * kmax), dtype=torch.int8)
        _SCRATCH.bufs = (work, xq)
    return work, xq, decode_threads(threads)


def linear_width(desc: LinearDesc) -> int:
    """Output columns of a (possibly fused) linear descriptor."""
    n, p = 0, desc
    while True:
        n += p.N
        if not p.next:
            return n
        p = p.next.contents


def _new_logits(rows: int, vocab: int, *, flat: bool = False) -> torch.Tensor:
    # A normal tensor, not an inference one: its version counter tells whether anything
    # changed the logits in place since the head found their greedy tokens
    # (sampling.remember_greedy).
    with torch.inference_mode(False):
        return torch.empty(vocab) if flat else torch.empty(rows, vocab)


# Bumped whenever any module, parameter or buffer is registered or replaced anywhere
# (torch's global registration hooks, installed with the first native forward): a decode
# step then rebuilds its plan instead of checking every module it reads.
_EPOCH = [0]
_HOOKS: list = []


def _bump(*_: object) -> None:
    _EPOCH[0] += 1


def _watch_registrations() -> None:
    if not _HOOKS:
        from torch.nn.modules import module as mod

        _HOOKS.extend(
            register(_bump)
            for register in (
                mod.register_module_module_registration_hook,
                mod.register_module_parameter_registration_hook,
                mod.register_module_buffer_registration_hook,
            )
        )


_DATA_PTR = torch.Tensor.data_ptr


class _Plan:
    """What every native step of a model reads, gathered once: the layers' descriptors,
    the final norm, the output head, the embedding table.

    After a step has streamed the weights through the caches, each Python operation between
    two calls runs from cold caches (module attribute reads, descriptor checks, a torch
    factory: tens of microseconds each). A step checks the plan with two things only: no
    module, parameter or buffer was registered since it was built (``_EPOCH``), and every
    tensor it points into still holds the same memory (``.data`` assignment, ``set_``,
    ``Module.to`` move storage without registering anything).
    """

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        self.epoch = _EPOCH[0]
        m = model.model
        stack, norm, head = m.layers, m.norm, _base(model.lm_head)
        self.lib, self.ptrs = lib, stack.layer_pointers()
        self.first = stack[0]
        self.norm_ptr, self.eps = norm.weight.data_ptr(), float(norm.eps)
        self.head_desc, self.vocab = head.describe(), head.out_features
        self.embed = m.embed_tokens
        self.embed_desc = _table_desc(self.embed)
        self.hidden = model.config.hidden_size
        # Whether every projection runs any number of rows on its kernels (kernel_rows None:
        # GGUF formats, tiled int8); others take longer pieces through PyTorch's matmul.
        mods = [
            _base(getattr(kl.layer.self_attn, n)) for kl in stack for n in ("qkv_proj", "o_proj")
        ]
        mods += [
            _base(getattr(kl.layer.mlp, n)) for kl in stack for n in ("gate_up_proj", "down_proj")
        ]
        self.any_rows = all(m.kernel_rows is None for m in [*mods, head])
        tensors = [w[2] for layer in stack for w in layer._desc[3]]
        tensors += [norm.weight, *head.buffers(recurse=False)]
        if self.embed_desc is not None:
            tensors += list(getattr(self.embed, "_table", self.embed).buffers(recurse=False))
            tensors += list(self.embed.parameters(recurse=False))
        self.tensors = tensors
        self.addrs = list(map(_DATA_PTR, tensors))

    @classmethod
    def build(cls, model: nn.Module) -> _Plan | None:
        m, lib = model.model, cpu_kernels()
        stack, norm, head = m.layers, m.norm, _base(model.lm_head)
        if (
            lib is None
            or not isinstance(stack, KernelStack)
            or not isinstance(head, KernelLinear)
            or not isinstance(norm.weight, torch.Tensor)
            or norm.weight.dtype != torch.float32
            or norm.weight.device.type != "cpu"
            or stack.layer_pointers() is None
        ):
            return None
        return cls(model, lib)

    def current(self) -> bool:
        return (
            self.epoch == _EPOCH[0]
            and list(map(_DATA_PTR, self.tensors)) == self.addrs
            and cpu_kernels() is self.lib  # (QWENLM_ISA may have changed: tests do)
        )


class NativeForward:
    """A whole forward pass of a small batch (or of one sequence's prefill piece, see
    ``logits``) in one native call: the token ids go in; the embedding rows, every layer, the
    final norm and the output head run in C; the logits (and each row's greedy token) come
    out.

    After a step has streamed the weights through the caches, the Python between two native
    calls runs from cold caches, several times slower than in a loop: the ~40 small
    operations of the generic path (rotary, plans, views, norm, output head) took ~2 ms of a
    ~19 ms 0.5B step on the 2-core EPYC, the checks and lookups of a step ~1 ms. Here a step
    checks a :class:`_Plan`, builds the call's small arrays and makes the call, with the
    kernels of ``KernelStack.run_all`` in the same order, then the final norm and head;
    tests hold the logits to the generic path's.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model  # its parts are read when a plan is built: a transform may replace them
        self.rope = RopeRows(model.model.rotary_emb, model.config.head_dim)
        self._plan: _Plan | None = None
        _watch_registrations()

    @classmethod
    def build(cls, model: nn.Module) -> NativeForward | None:
        """The native forward of ``model``, or None where it does not apply: layers not
        accelerated, an output head the kernels do not run, position-dependent attention
        (windows, dual chunks, LogN, dynamic NTK), tensor-parallel shards."""
        m = getattr(model, "model", None)
        head = _base(getattr(model, "lm_head", None))
        if (
            cpu_kernels() is None
            or m is None
            or not isinstance(getattr(m, "layers", None), KernelStack)
            or not isinstance(head, KernelLinear)
            or head.in_features % head.kernel_multiple
            or getattr(model, "shard", None) is not None
            or m.rotary_emb.dynamic_ntk
            or not isinstance(getattr(m, "norm", None), RMSNorm)
        ):
            return None
        plans = make_plans(model.config, torch.zeros(1, 1, dtype=torch.long),
                           m.rotary_emb, training=False)  # fmt: skip
        if not all(p.ordinary for p in plans):
            return None
        return cls(model)

    def piece_rows(self) -> int | None:
        """Rows per native call of a prefill piece longer than a small batch (``PIECE_ROWS``),
        or None where such pieces take the PyTorch path (or nothing runs natively)."""
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = _Plan.build(self.model)
        return PIECE_ROWS if plan is not None and plan.any_rows else None

    def logits(
        self, layout: list, ids: list[int], positions: list[int], rows: list[int]
    ) -> tuple[torch.Tensor, list[int]] | None:
        """Logits (len(rows), vocab) of the batch rows ``rows`` ((vocab,) for one row),
        after feeding ``ids`` at ``positions`` (the engine's flattened batch, ``layout`` its
        segments), and each row's greedy token (the first largest logit, -1 where not
        computed); None where this step cannot run natively (the caller takes the generic
        path).

        More rows than a small batch run here too where every projection takes any number
        of rows on its integer kernels (GGUF formats, tiled int8): one sequence's (a prefill
        piece) in calls of up to ``PIECE_ROWS`` rows, several sequences' (a decode step with a
        prompt's part riding along) up to ``SMALL_BATCH + PIECE_ROWS`` rows in one call. Each
        row gets the same numbers in any of these calls (its arithmetic is its own; see the
        kernels).
        Through the PyTorch modules a 17-128-token piece cost 1.5-2x per token what 16-row
        native calls cost (~100 small operations a layer from cold caches)."""
        n = len(ids)
        if len(layout) > MAX_SEGMENTS:
            return None
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = _Plan.build(self.model)
            if plan is None:
                return None
        if n > SMALL_BATCH and not (
            plan.any_rows and (len(layout) == 1 or n <= SMALL_BATCH + PIECE_ROWS)
        ):
            return None
        lib = plan.lib
        h = _residual_rows(n, plan.hidden)  # the residual stream, updated in place
        if plan.embed_desc is not None:
            got = lib.qlm_embed_rows(
                ctypes.byref(plan.embed_desc), (ctypes.c_int64 * n)(*ids), n, h.data_ptr()
            )
            if got != 0:
                return None  # an id outside the table: the generic path raises the error
        else:
            rows_of = getattr(plan.embed, "rows_of", None)  # a GGUF table's cached float rows
            e = rows_of(ids) if rows_of is not None else plan.embed(torch.tensor(ids))
            if e.dtype != torch.float32 or e.device.type != "cpu":
                return None
            h[:n] = e.reshape(n, plan.hidden)
        cos, sin, keep = self.rope.pointers(positions)
        caches = [seq.cache for seq, _, _ in layout]
        kv = (ctypes.c_void_p * len(caches))(*map(_layer_caches, caches))
        # one row: a (vocab,) tensor, what the engine returns (no view made from cold caches)
        logits = _new_logits(len(rows), plan.vocab, flat=len(rows) == 1)
        best = (ctypes.c_int64 * len(rows))()
        if n <= SMALL_BATCH or len(layout) > 1:  # (a decode step with a prompt's part: one call)
            segs, longest = _segments(layout)
            pieces = [(0, n, segs, longest, rows, 0)]
        else:  # one sequence's piece, in calls of PIECE_ROWS rows
            kc, pieces = caches[0], []
            for i in range(0, n, PIECE_ROWS):
                j = min(n, i + PIECE_ROWS)
                seg = SegmentDesc(0, j - i, kc.capacity, kc.length + i, None, None, None, None)
                wanted = [r - i for r in rows if i <= r < j]
                first = next((k for k, r in enumerate(rows) if r >= i), len(rows))
                pieces.append((i, j - i, (SegmentDesc * 1)(seg), kc.length + j, wanted, first))
        first_layer, hidden, row = plan.first, plan.hidden * 4, self.rope.row_bytes
        for i, m, segs, longest, wanted, k0 in pieces:
            work, xq, threads = _scratch(lib, first_layer, first_layer._desc[0], m, longest)
            got = (ctypes.c_int64 * max(1, len(wanted)))()
            lib.qlm_stack_forward(
                plan.ptrs, len(plan.ptrs), h.data_ptr() + i * hidden, m, cos + i * row,
                sin + i * row, segs, kv, len(segs), caches[-1].kv_type, work.data_ptr(),
                xq.data_ptr(), threads, plan.norm_ptr, plan.eps,
                ctypes.byref(plan.head_desc) if wanted else None,
                (ctypes.c_int64 * len(wanted))(*wanted), len(wanted),
                logits.data_ptr() + k0 * plan.vocab * 4, got,
            )  # fmt: skip
            best[k0 : k0 + len(wanted)] = got[: len(wanted)]
        del keep
        return logits, best[:]


def _residual_rows(n: int, hidden: int) -> torch.Tensor:
    """A thread's scratch for the residual stream of a native step: (SMALL_BATCH, hidden),
    one per hidden size (a process may run models of several sizes); a longer prefill piece
    gets a tensor of its own (not kept: a piece may be any length)."""
    if n > SMALL_BATCH:
        return torch.empty(n, hidden)
    bufs = getattr(_SCRATCH, "h", None)
    if bufs is None:
        bufs = _SCRATCH.h = {}
    h = bufs.get(hidden)
    if h is None:
        h = bufs[hidden] = torch.empty(SMALL_BATCH, hidden)
    return h


def _table_desc(embed: nn.Module) -> LinearDesc | None:
    """The embedding table as a kernel descriptor (qlm_embed_rows reads one part of float32
    rows or GGUF blocks), or None where it is another kind of table."""
    table = getattr(embed, "_table", None)  # quant.gguf.GGUFEmbedding's (maybe shared) table
    if isinstance(table, KernelLinear) and len(getattr(table, "parts", ())) == 1:
        return table.describe() if table.qweight.device.type == "cpu" else None
    if type(embed) is not nn.Embedding or embed.max_norm is not None:
        return None  # (max_norm renormalizes the table's rows as it reads them)
    w = embed.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
        return None
    # The plan that holds this descriptor holds w (and checks its address) too.
    return LinearDesc(int(Kind.F32), w.data_ptr(), None, None, None, w.shape[0], w.shape[1], 0)


class RopeRows:
    """Rotary cos/sin rows by position, from a table computed in one call and kept.

    Elementwise float32 arithmetic gives each position the same bits whether computed alone
    or in a table (a test holds them equal), and a table row costs nothing at decode time.
    Positions past ``limit`` are computed on demand (attention dominates there anyway).
    """

    limit = 8192

    def __init__(self, rotary: nn.Module, head_dim: int) -> None:
        self.rotary = rotary
        self.table = (torch.empty(0, head_dim), torch.empty(0, head_dim))  # replaced whole
        self.row_bytes = 4 * head_dim
        self._at = (0, 0, 0, self.row_bytes)  # the table's rows, cos and sin addresses, row bytes

    def _grow(self, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table
        if top > cos.shape[0] and top <= self.limit:
            n = min(self.limit, max(top, 2 * cos.shape[0], 1024))
            cos, sin = (t[0].contiguous() for t in self.rotary(torch.arange(n)[None]))
            self.table = (cos, sin)
            self._at = (n, cos.data_ptr(), sin.data_ptr(), self._at[3])
        return cos, sin

    def pointers(self, positions: list[int]) -> tuple[int, int, object]:
        """Addresses of cos, sin rows for ``positions`` (contiguous, len(positions) x
        head_dim) and what keeps them alive: for consecutive positions, rows of the table
        itself (no tensor made: a step's Python runs from cold caches)."""
        first, last = positions[0], positions[-1]
        n, c, s, row = self._at
        consecutive = first >= 0 and (
            len(positions) == 1 or all(p == first + i for i, p in enumerate(positions))
        )
        if consecutive and last < n:
            return c + first * row, s + first * row, None
        if consecutive and last < self.limit:
            self._grow(last + 1)
            return self.pointers(positions)
        cos, sin = self.rows(positions)
        return cos.data_ptr(), sin.data_ptr(), (cos, sin)

    def rows(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (len(positions), head_dim), contiguous."""
        top = max(positions) + 1
        cos, sin = self._grow(top)
        if top > cos.shape[0]:
            return tuple(t[0].contiguous() for t in self.rotary(torch.tensor([positions])))
        if len(positions) == 1:
            p = positions[0]
            return cos[p : p + 1], sin[p : p + 1]
        idx = torch.tensor(positions)
        return cos[idx], sin[idx]


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
    model.native_forward = NativeForward.build(model)  # what engines look for
    return True
