"""GGUF block formats on the native kernels, at every instruction-set level this CPU runs.

Each format's kernel is checked against a dequantize-then-matmul reference written from the
format's definition (gguf's own numpy dequantizers) on random blocks with extreme scales; a
row's result must not depend on the rows computed with it; the load-time packing must keep
every bit and add none; the C structs' ctypes mirrors must match; and the fused decoder layer
and the real model must agree with the PyTorch path, with f32 mode and with llama.cpp.
"""

from __future__ import annotations

import ctypes
import hashlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from helpers import tiny_config, write_tiny_gguf

import qwenlm
from qwenlm.errors import GenerationError
from qwenlm.generation.engine import Engine
from qwenlm.generation.fastpath import KernelLayer
from qwenlm.kernels import (
    ISA_LEVELS,
    Kind,
    LayerDesc,
    LinearDesc,
    SegmentDesc,
    cpu_kernels,
    runnable_isas,
)
from qwenlm.quant import QuantizationError
from qwenlm.quant.gguf import KINDS, GGUFLinear, pack, unpack
from qwenlm.quant.linear import Int8Linear

FORMATS = list(KINDS)
# The byte offsets of each format's float16 scale fields (d, and dmin / m where it has one).
SCALE_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
# Tiny (a float16 subnormal), small, large, the largest float16, zero, and negative scales.
SCALES = [6e-8, -3e-5, 1e-3, -0.02, 0.5, -700.0, 65504.0, 0.0]


@pytest.fixture(params=ISA_LEVELS)
def isa(request, monkeypatch):
    """Each instruction-set level in turn (forced with QWENLM_ISA), skipping those this CPU
    cannot run."""
    if request.param not in runnable_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    monkeypatch.setenv("QWENLM_ISA", request.param)
    if cpu_kernels() is None:
        pytest.skip(f"the {request.param} kernels could not be built here")
    return request.param


def random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random quants with scales drawn from SCALES: (rows, row bytes) as a GGUF file holds."""
    g = torch.Generator().manual_seed(seed)
    per, size = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (rows, cols // per, size), dtype=torch.uint8, generator=g)
    table = torch.tensor(SCALES, dtype=torch.float16)
    for off in SCALE_FIELDS[qtype]:
        d = table[torch.randint(0, len(SCALES), (rows, cols // per), generator=g)]
        raw[:, :, off : off + 2] = d.view(torch.uint8).view(rows, cols // per, 2)
    return raw.reshape(rows, -1)


def reference_weight(qtype: T, raw: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(raw.numpy(), qtype).astype(np.float64))


def act_block(qtype: T) -> int:
    """The kernels' activation block for a weight format: 256 for the K-quants (llama.cpp's
    Q8_K), 32 for the others (Q8_0)."""
    return 256 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 32


def quantize_activations(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The kernels' int8 activations, from their definition: per block, d = amax / 127 and
    codes round(x * 127 / amax) (half away from zero); returned dequantized (float64)."""
    xb = x.view(x.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    v = xb * inv
    q = torch.where(v < 0, v - 0.5, v + 0.5).trunc()
    return (q.double() * (amax / 127.0).double()).view_as(x)


def shape_for(qtype: T) -> tuple[int, int]:
    # Row counts that are not a multiple of the 8-row groups; for 32-element formats an input
    # length that is not a multiple of 256.
    return (37, 512) if GGML_QUANT_SIZES[qtype][0] == 256 else (37, 288)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_packing_keeps_every_bit_and_adds_none(qtype):
    raw = torch.randint(
        0,
        256,
        (13, 512 // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]),
        dtype=torch.uint8,
    )
    packed = pack(qtype, raw)
    assert packed.numel() == 16 * raw.shape[1]  # padded to 2 groups of 8 rows, nothing widened
    assert torch.equal(unpack(qtype, packed, 13), raw)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_kernel_equals_dequantize_then_matmul(qtype, isa):
    rows, cols = shape_for(qtype)
    raw = random_blocks(qtype, rows, cols, seed=int(qtype))
    w = reference_weight(qtype, raw)
    bias = torch.randn(rows)
    layer = GGUFLinear([(qtype, rows, pack(qtype, raw))], cols, bias)
    x = torch.randn(16, cols, generator=torch.Generator().manual_seed(1)) * 3
    x[3] = 0.0  # an all-zero row: every block scale 0
    x[5, :32] *= 1e-30  # a block of tiny activations
    y = layer(x).double()
    # 1. With the same int8 activations, the integer sums are exact: only float32 rounding
    # remains, a few ulps per block (the block's scale product and its accumulation), so the
    # error is bounded by (blocks + 4) * 2^-23 of the sum of the terms' magnitudes.
    block = act_block(qtype)
    xq = quantize_activations(x, block)
    ref = xq @ w.T + bias.double()
    blocks = cols // 32
    magnitude = xq.abs() @ w.abs().T + bias.double().abs()
    assert ((y - ref).abs() <= (blocks + 4) * 2.0**-23 * magnitude + 1e-30).all()
    # 2. Against float activations, the int8 rounding adds at most half a code per element:
    # |sum_k w_k (x_k - xq_k)| <= sum over blocks of d_b / 2 * sum_k |w_k|.
    d = x.view(16, -1, block).abs().amax(-1).double() / 127
    bound = (d / 2).repeat_interleave(block, dim=1) @ w.abs().T
    exact = x.double() @ w.T + bias.double()
    assert ((y - exact).abs() <= bound + (blocks + 4) * 2.0**-23 * magnitude + 1e-30).all()


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_a_rows_result_never_depends_on_its_batch(qtype, isa):
    rows, cols = shape_for(qtype)
    raw = random_blocks(qtype, rows, cols, seed=7)
    layer = GGUFLinear([(qtype, rows, pack(qtype, raw))], cols, None)
    x = torch.randn(40, cols, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([layer(x[i : i + 1]) for i in range(40)])
    for n in range(1, 17):
        assert torch.equal(layer(x[:n]), alone[:n]), n
    assert torch.equal(layer(x[9:25]), alone[9:25])  # any position within a pass
    assert torch.equal(layer(x), alone)  # 40 rows: three passes over each weight block


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_every_level_gives_the_scalar_levels_bits(qtype, isa, monkeypatch):
    # The levels run one kernel source over different instructions; the integer sums are exact
    # and the float steps identical, so results must agree bit for bit.
    rows, cols = shape_for(qtype)
    raw = random_blocks(qtype, rows, cols, seed=3)
    layer = GGUFLinear([(qtype, rows, pack(qtype, raw))], cols, None)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(3))
    got = layer(x)
    monkeypatch.setenv("QWENLM_ISA", "scalar")
    assert torch.equal(got, layer(x))


def test_a_fused_projection_of_mixed_formats_equals_its_parts(isa):
    parts = [(T.Q5_0, 24), (T.Q8_0, 8), (T.Q4_1, 13)]
    mods = []
    for i, (qtype, rows) in enumerate(parts):
        raw = random_blocks(qtype, rows, 96, seed=i)
        mods.append(GGUFLinear([(qtype, rows, pack(qtype, raw))], 96, torch.randn(rows)))
    mods.append(GGUFLinear([(T.F32, 5, torch.randn(5, 96))], 96, None))
    fused = GGUFLinear.concat(mods)
    x = torch.randn(3, 96)
    assert torch.equal(fused(x), torch.cat([m(x) for m in mods], dim=-1))
    assert torch.equal(fused.dequantize(), torch.cat([m.dequantize() for m in mods]))


def test_a_fused_projection_of_both_activation_copies_equals_its_parts(isa):
    # K-quants read the activations' per-256 copy, the others the per-32 one: a chain of both
    # gets both, each part the same numbers as alone.
    parts = [(T.Q5_0, 24), (T.Q4_K, 16), (T.Q8_0, 8), (T.Q6_K, 9), (T.Q5_K, 8)]
    mods = []
    for i, (qtype, rows) in enumerate(parts):
        raw = random_blocks(qtype, rows, 512, seed=10 + i)
        mods.append(GGUFLinear([(qtype, rows, pack(qtype, raw))], 512, torch.randn(rows)))
    fused = GGUFLinear.concat(mods)
    x = torch.randn(5, 512) * 2
    assert torch.equal(fused(x), torch.cat([m(x) for m in mods], dim=-1))


def test_pytorch_fallback_computes_the_same_maths(monkeypatch):
    raw = random_blocks(T.Q5_0, 16, 128)
    layer = GGUFLinear([(T.Q5_0, 16, pack(T.Q5_0, raw))], 128, torch.randn(16))
    x = torch.randn(4, 128)
    monkeypatch.setenv("QWENLM_KERNELS", "0")
    w = reference_weight(T.Q5_0, raw).float()
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)


def test_embedding_rows_come_from_the_packed_table():
    from qwenlm.quant.gguf import GGUFEmbedding

    raw = random_blocks(T.Q8_0, 21, 64)
    table = GGUFLinear([(T.Q8_0, 21, pack(T.Q8_0, raw))], 64, None)
    ids = torch.tensor([[0, 20, 7], [8, 8, 15]])
    w = reference_weight(T.Q8_0, raw).float()
    assert torch.equal(GGUFEmbedding(table)(ids), w[ids])
    assert torch.equal(GGUFEmbedding(table, shared=True)(ids), w[ids])
    # small lookups (decode steps) come from a cache of rows: the same values, again and
    # after a change of the table in place
    emb = GGUFEmbedding(table)
    for _ in range(2):
        assert torch.equal(emb(ids), w[ids]) and torch.equal(emb(ids[:, :1]), w[ids[:, :1]])
    raw2 = random_blocks(T.Q8_0, 21, 64, seed=5)
    with torch.no_grad():
        table.qweight.copy_(GGUFLinear([(T.Q8_0, 21, pack(T.Q8_0, raw2))], 64, None).qweight)
    assert torch.equal(emb(ids), reference_weight(T.Q8_0, raw2).float()[ids])
    long_ids = torch.arange(20).repeat(2)[None]  # more than 16: the table, not the cache
    assert torch.equal(emb(long_ids), reference_weight(T.Q8_0, raw2).float()[long_ids])


@pytest.mark.parametrize("qtype", [*FORMATS, T.F32], ids=lambda t: t.name)
def test_native_embedding_rows_equal_the_formats_definition(qtype, isa):
    # A decode step's embedding rows, read natively from the packed (interleaved) table,
    # are the values gguf's own dequantizer gives, exactly: rows in every lane of a group,
    # in the last, padded group, repeated ones.
    rows, cols = shape_for(qtype) if qtype != T.F32 else (37, 64)
    if qtype == T.F32:
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2))
        table = GGUFLinear([(T.F32, rows, w)], cols, None)
    else:
        raw = random_blocks(qtype, rows, cols, seed=4)
        w = reference_weight(qtype, raw).float()
        table = GGUFLinear([(qtype, rows, pack(qtype, raw))], cols, None)
    lib = cpu_kernels()
    ids = [0, 36, 8, 7, 15, 31, 32, 36, 1]
    out = torch.full((len(ids), cols), float("nan"))
    desc = table.describe()
    got = lib.qlm_embed_rows(ctypes.byref(desc), (ctypes.c_int64 * len(ids))(*ids), len(ids),
                             out.data_ptr())  # fmt: skip
    assert got == 0
    assert torch.equal(out, w[ids])
    # an id outside the table: refused, nothing read past it
    for bad in (-1, rows):
        arr = (ctypes.c_int64 * 2)(0, bad)
        assert lib.qlm_embed_rows(ctypes.byref(desc), arr, 2, out.data_ptr()) == -2


def test_native_embedding_rows_refuse_a_fused_table(isa):
    a = GGUFLinear([(T.Q8_0, 8, pack(T.Q8_0, random_blocks(T.Q8_0, 8, 64)))], 64, None)
    fused = GGUFLinear.concat([a, a])
    out = torch.empty(1, 64)
    arr = (ctypes.c_int64 * 1)(0)
    got = cpu_kernels().qlm_embed_rows(ctypes.byref(fused.describe()), arr, 1, out.data_ptr())
    assert got == -1


def test_int8_rows_interleaved_or_plain_give_the_same_bits(isa, monkeypatch):
    # The fast path's int8 layout runs on the GGUF kernels (Q8_0's interleaving), a plain
    # layout on a row kernel; both compute each row's exact block sums, then one fma per
    # block: the same bits at every level, in any batch.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 320, generator=g) * 0.05
    w[3, :32] = 0.0  # an all-zero block
    plain = Int8Linear.from_float(w, torch.randn(40, generator=g))
    tiled = Int8Linear.from_float(w, plain.bias).tile()
    assert tiled.tiled and torch.equal(tiled.weight_codes(), plain.qweight)
    x = torch.randn(13, 320, generator=g) * 4
    y = tiled(x)
    assert torch.equal(y, plain(x))
    assert torch.equal(torch.cat([tiled(x[i : i + 1]) for i in range(13)]), y)
    monkeypatch.setenv("QWENLM_ISA", "scalar")
    assert torch.equal(tiled(x), y) and torch.equal(plain(x), y)


def test_moving_tensors_to_huge_pages_keeps_their_values_and_identity():
    from qwenlm.kernels import move_to_huge_pages

    a = torch.randn(700, 300)
    view = a[10:20]  # shares a's storage
    codes = torch.randint(-128, 128, (3, 77), dtype=torch.int8)
    half = torch.randn(5).half()
    before = [t.clone() for t in (a, view, codes, half)]
    moved = move_to_huge_pages([a, view, codes, half, a])
    for t, b in zip((a, view, codes, half), before, strict=True):
        assert torch.equal(t, b)
    if moved:  # Linux: one block of memory, the view still inside a's data
        assert moved >= a.nbytes + codes.nbytes + half.nbytes
        assert view.data_ptr() - a.data_ptr() == 10 * 300 * 4
        assert a.untyped_storage().data_ptr() == codes.untyped_storage().data_ptr()


@pytest.mark.skipif(cpu_kernels() is None, reason="native kernels could not be built here")
def test_c_structs_and_kind_codes_match_their_python_mirrors():
    lib = cpu_kernels()
    for struct, name in (
        (LinearDesc, "qlm_linear_t"),
        (LayerDesc, "qlm_layer_t"),
        (SegmentDesc, "qlm_segment_t"),
    ):
        assert lib.qlm_layout(name.encode()) == ctypes.sizeof(struct), name
        for field, *_ in struct._fields_:
            offset = getattr(struct, field).offset
            assert lib.qlm_layout(f"{name}.{field}".encode()) == offset, (name, field)
    assert lib.qlm_layout(b"no_such_struct") == -1
    for kind in Kind:
        assert lib.qlm_kind_name(int(kind)).decode() == kind.name
    assert lib.qlm_kind_name(len(Kind)) == b""  # C has no kind Python lacks


def test_unknown_or_unrunnable_isa_is_a_clear_error(monkeypatch):
    from qwenlm.kernels import KernelError

    monkeypatch.setenv("QWENLM_ISA", "avx1024")
    with pytest.raises(KernelError, match="unknown QWENLM_ISA"):
        cpu_kernels()
    missing = [level for level in ISA_LEVELS if level not in runnable_isas()]
    if missing:
        monkeypatch.setenv("QWENLM_ISA", missing[0])
        with pytest.raises(KernelError, match="cannot run"):
            cpu_kernels()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-q5.gguf"
    write_tiny_gguf(path, tiny_config(intermediate_size=128, num_hidden_layers=3), qtype="Q5_0")
    return path


def test_gguf_mode_runs_the_file_as_stored(tiny_gguf, isa):
    model = qwenlm.load(tiny_gguf, quant="gguf")
    assert model.weight_format == "gguf"
    layers = model.model.model.layers
    assert all(isinstance(layer, KernelLayer) for layer in layers)
    qkv = layers[0].layer.self_attn.qkv_proj
    assert isinstance(qkv, GGUFLinear) and {p[0] for p in qkv.parts} == {int(T.Q5_0)}
    assert_native_layers_equal_their_modules(model, tiny_gguf)


def test_long_prefill_pieces_run_natively_row_for_row(tiny_gguf, isa, monkeypatch):
    # A prefill piece longer than a small batch runs natively too (GGUF projections take any
    # number of rows on their kernels), in calls of PIECE_ROWS rows. Each row's arithmetic is
    # its own, so every row's logits equal bit for bit those of the same tokens fed 16 at a
    # time (the small-batch native call), the cache they leave decodes alike, and they match
    # the PyTorch modules: both quantize activations to int8 alike and differ by float
    # rounding (norms, rotary, attention) that flips a few codes, so over 100 positions of a
    # random model they stay closer to each other than the PyTorch path is to the float model
    # (dequantized weights, float activations): 0.14 against 0.56 here. A row misplaced in a
    # piece (wrong position, wrong cache) misses that by far.
    from qwenlm.generation import fastpath

    model = qwenlm.load(tiny_gguf, quant="gguf")
    engine = Engine(model.model)
    assert engine.native is not None and engine.native._plan is None
    monkeypatch.setattr(fastpath, "PIECE_ROWS", 24)  # 100 rows: 4 full calls and a part
    p = [(7 * i + 3) % 200 for i in range(100)]

    def fail(*a, **k):
        pytest.fail("the piece left the native forward")

    monkeypatch.setattr(KernelLayer, "forward", fail)
    monkeypatch.setattr(fastpath.KernelStack, "run_all", fail)
    whole_seq, small_seq = engine.new_sequence(), engine.new_sequence()
    (whole,) = engine.forward([(whole_seq, p)], all_logits=True)
    small = [
        engine.forward([(small_seq, p[i : i + 16])], all_logits=True)[0] for i in range(0, 100, 16)
    ]
    assert whole.shape == (100, model.config.vocab_size)
    assert torch.equal(whole, torch.cat(small))
    (last,) = engine.forward([(whole_seq, p[:40])])  # the last row's logits alone
    for i in range(0, 40, 16):
        (small_last,) = engine.forward([(small_seq, p[i : min(40, i + 16)])])
    assert last.shape == (model.config.vocab_size,) and torch.equal(last, small_last)
    (a,) = engine.forward([(whole_seq, [5])])
    (b,) = engine.forward([(small_seq, [5])])
    assert torch.equal(a, b)
    monkeypatch.undo()
    engine.native = None
    generic_seq = engine.new_sequence()
    (generic,) = engine.forward([(generic_seq, p)], all_logits=True)
    f32 = Engine(qwenlm.load(tiny_gguf, quant="f32").model)
    f32.native = None
    (reference,) = f32.forward([(f32.new_sequence(), p)], all_logits=True)
    assert (whole - generic).abs().max() < (generic - reference).abs().max()


def assert_native_layers_equal_their_modules(model, path) -> None:
    """The fused native layers of ``model`` against the same layers of ``path`` run as PyTorch
    ops around the same projection modules, over decode steps and a verification batch: they
    differ only by float rounding in norms, rotary and attention, which can flip an int8
    activation code (2e-2 as in test_quantization's kernel checks)."""
    slow = qwenlm.load(path, quant="gguf").model
    slow.model.layers = torch.nn.ModuleList(kl.layer for kl in slow.model.layers)
    ef, es = Engine(model.model), Engine(slow)
    sf, ss = ef.new_sequence(), es.new_sequence()
    p = list(range(3, 40))
    ef.forward([(sf, p)])
    es.forward([(ss, p)])
    for t in (5, 9, 200, 17):
        (a,) = ef.forward([(sf, [t])])
        (b,) = es.forward([(ss, [t])])
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    (a,) = ef.forward([(sf, [4, 8, 15])], all_logits=True)
    (b,) = es.forward([(ss, [4, 8, 15])], all_logits=True)
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["o-input-own-phase", "o-input-by-attention"])
def test_k_quant_layers_run_natively_as_their_modules_do(tmp_path, kv_heads, isa):
    # K-quant projections read the activations' per-256 copy, which the native layer makes in
    # its norm / SwiGLU phases and, for the o projection, in the attention tasks when a KV
    # head's query heads span whole super-blocks (8 heads of 64 on 2 KV heads: 4 x 64 = 256),
    # else in a phase of its own (on 4 KV heads: 128). Both against the same modules run one
    # by one.
    def k_blocks(name: str, arr: np.ndarray) -> tuple[np.ndarray, T]:
        # random quants with moderate scales (a model's activations stay finite)
        qtype = T.Q6_K if "down" in name or "embed" in name else T.Q4_K
        seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        raw = random_blocks(qtype, *arr.shape, seed=seed)
        blocks = raw.view(arr.shape[0], -1, GGML_QUANT_SIZES[qtype][1])
        g = torch.Generator().manual_seed(seed)
        for off in SCALE_FIELDS[qtype]:
            d = (torch.rand(blocks.shape[:2], generator=g) * 2e-3 + 1e-3).half()
            blocks[:, :, off : off + 2] = d.view(torch.uint8).view(*blocks.shape[:2], 2)
        return raw.numpy(), qtype

    config = tiny_config(
        hidden_size=512,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
    )
    path = tmp_path / "tiny-k.gguf"
    write_tiny_gguf(path, config, blocks=k_blocks)
    model = qwenlm.load(path, quant="gguf")
    layers = model.model.model.layers
    assert all(isinstance(layer, KernelLayer) for layer in layers)
    down = layers[0].layer.mlp.down_proj
    assert {p[0] for p in down.parts} == {int(T.Q6_K)}
    assert_native_layers_equal_their_modules(model, path)


def test_auto_runs_a_block_quantized_gguf_file_as_stored(tiny_gguf, tmp_path):
    # auto: a quantized GGUF file in its own formats (fastest, least memory); a float GGUF
    # file as int8 (gguf mode would run it as float32); an explicit mode always wins.
    assert qwenlm.load(tiny_gguf).weight_format == "gguf"
    assert qwenlm.load(tiny_gguf, quant="int8").weight_format == "int8"
    f16 = tmp_path / "tiny-f16.gguf"
    write_tiny_gguf(f16, tiny_config(intermediate_size=128, num_hidden_layers=3), qtype="F16")
    assert qwenlm.load(f16).weight_format == "int8"


def test_kv_cache_auto_is_f16_for_gguf_mode_only(tiny_gguf):
    # As llama.cpp keeps a GGUF model's cache; the other modes keep float32 (comparable with
    # transformers) unless asked, and a bad name fails before any weights load.
    assert qwenlm.load(tiny_gguf).engine.kv_dtype == torch.float16
    assert qwenlm.load(tiny_gguf, kv_cache="float").engine.kv_dtype == torch.float32
    assert qwenlm.load(tiny_gguf, quant="int8").engine.kv_dtype == torch.float32
    assert qwenlm.load(tiny_gguf, quant="int8", kv_cache="f16").engine.kv_dtype == torch.float16
    with pytest.raises(GenerationError, match="unknown KV cache format 'fp8'"):
        qwenlm.load(tiny_gguf, kv_cache="fp8")


def test_results_do_not_depend_on_the_thread_count(tiny_gguf):
    # Tasks are claimed dynamically, so which thread computes what changes from run to run;
    # every task computes its outputs the same way, so the results must not.
    model = qwenlm.load(tiny_gguf, quant="gguf")
    raw = random_blocks(T.Q4_K, 70, 512)
    layer = GGUFLinear([(T.Q4_K, 70, pack(T.Q4_K, raw))], 512, None)
    x = torch.randn(20, 512)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            engine = Engine(model.model)
            seq = engine.new_sequence()
            engine.forward([(seq, list(range(3, 30)))])
            (logits,) = engine.forward([(seq, [11])])
            results.append((layer(x), logits))
    finally:
        torch.set_num_threads(before)
    for y, logits in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(logits, results[0][1])


def test_gguf_mode_needs_a_gguf_file(tmp_path):
    from helpers import tiny_model

    from qwenlm.quant import load_quantized, quantize

    with pytest.raises(QuantizationError, match="cannot convert a float model"):
        quantize(tiny_model(tiny_config()), "gguf")
    from qwenlm.weights import open_checkpoint

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tiny_config(), qtype="Q8_0")
    with open_checkpoint(path) as ckpt:
        ckpt.format = "hf"  # as a Hugging Face folder would be
        with pytest.raises(QuantizationError, match="not a GGUF file"):
            load_quantized(ckpt, "gguf")


# -- the real model -----------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_greedy_tokens_in_gguf_mode_equal_f32_mode(real_model_path):
    prompt = "def quicksort(arr):"
    out = {}
    for mode in ("gguf", "f32"):
        model = qwenlm.load(real_model_path, quant=mode)
        out[mode] = model.generate(prompt, max_new_tokens=24, temperature=0)
        del model
    assert out["gguf"] == out["f32"]


@pytest.mark.real_model
def test_real_model_logits_in_gguf_mode_match_llama_cpp(real_model_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    text = "The quick brown fox jumps over the lazy dog. In the beginning God created"
    model = qwenlm.load(real_model_path, quant="gguf")
    ids = model.tokenizer.encode(text)
    with torch.no_grad():
        ours = model.model(torch.tensor([ids]))[0].double()
    llm = llama_cpp.Llama(
        str(real_model_path), n_ctx=128, logits_all=True, n_threads=2, verbose=False
    )
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
    # Both run the file's weights on int8-quantized activations (Q8_0 blocks of 32 for the
    # legacy formats, Q8_K blocks of 256 for the K-quants) and differ in float summation order,
    # rounding ties and the embedding: our
    # embedding reads the output head's Q8_0 table where llama.cpp reads the file's Q5_0 copy.
    # Measured on this text: max |difference| 0.74, 0.24 of the logits' standard deviation
    # (~2.7) at that position; our f32 mode (no activation rounding at all) is as far from
    # llama.cpp (0.66, 0.28 std), so the bound is what llama.cpp's own activation rounding
    # allows, with room. The top token agrees at 14 of 15 positions (one near-tie) in every
    # mode. A wrong kernel or layout scrambles the logits (differences of several std).
    spread = theirs.std(dim=-1, keepdim=True)
    assert ((ours - theirs).abs() / spread).max() < 0.5
    agree = (ours.argmax(-1) == theirs.argmax(-1)).double().mean()
    assert agree >= 0.8
