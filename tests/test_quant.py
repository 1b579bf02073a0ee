"""Quantized layers and native kernels: agreement with dequantized references, exact rows."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    F32_EPS,
    assert_float32_close,
    float32_tolerance,
    float64_logits,
    tiny_config,
    tiny_model,
    write_tiny_gguf,
)

import qwenlm
from qwenlm.generation.fastpath import accelerate
from qwenlm.kernels import cpu_kernels
from qwenlm.models import build_model
from qwenlm.quant import Int8Embedding, QuantizationError, load_quantized, quantize
from qwenlm.quant.linear import DenseLinear, Int4Linear, Int8Linear
from qwenlm.weights import open_checkpoint

needs_kernels = pytest.mark.skipif(
    cpu_kernels() is None, reason="native kernels could not be built here"
)
LAYERS = [
    ("f32", lambda w, b: DenseLinear(w, b)),
    ("int8", Int8Linear.from_float),
    ("int4-32", lambda w, b: Int4Linear.from_float(w, b, 32)),
    ("int4-64", lambda w, b: Int4Linear.from_float(w, b, 64)),
    ("int4-128", lambda w, b: Int4Linear.from_float(w, b, 128)),
]


def weights(N=200, K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)


def reference(layer, x: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ W.T + b`` with the layer's dequantized weight, in float32 and in float64 (exact)."""
    w = layer.dequantize()
    return x @ w.T + b, x.double() @ w.double().T + b.double()


def q8_activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M, N) worst-case output error from rounding ``x`` to int8 per block of 32 (GGUF's Q8_0).

    Each activation moves at most half a step, amax(its block) / 254, so output n moves at most
    sum_i |w[n, i]| * amax(block of i) / 254.
    """
    M, K = x.shape
    amax = x.double().view(M, K // 32, 32).abs().amax(-1)  # (M, blocks)
    return (amax / 254) @ w.double().abs().view(-1, K // 32, 32).sum(-1).T


@needs_kernels
@pytest.mark.parametrize("name, make", LAYERS)
def test_kernel_matches_dequantized_matmul(name, make):
    w, b = weights()
    layer = make(w, b)
    g = torch.Generator().manual_seed(1)
    for M in (1, 3, 16, 17, 40):  # 17+ rows take the dequantize + matmul path
        x = torch.randn(M, w.shape[1], generator=g)
        ref, exact = reference(layer, x, b)
        # float32 sums in the kernel's order: as close to float64 as torch's matmul is
        tol = float32_tolerance(ref, exact)
        if name != "f32" and M <= 16:  # int kernels also round the activations to int8
            tol = tol + q8_activation_bound(x, layer.dequantize())
        assert ((layer(x).double() - exact).abs() <= tol).all(), (name, M)


@needs_kernels
@pytest.mark.parametrize("name, make", LAYERS)
def test_a_rows_result_does_not_depend_on_its_batch(name, make):
    w, b = weights()
    layer = make(w, b)
    x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(2))
    together = layer(x)
    for i in (0, 7, 15):
        assert torch.equal(layer(x[i : i + 1])[0], together[i])
    assert torch.equal(layer(x[3:9]), together[3:9])


@pytest.mark.parametrize("name, make", LAYERS)
def test_pytorch_fallback_agrees_with_kernels(name, make, monkeypatch):
    w, b = weights()
    layer = make(w, b)
    x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(3))
    with_kernels = layer(x)
    monkeypatch.setattr("qwenlm.quant.linear.cpu_kernels", lambda: None)
    without = layer(x)
    ref, exact = reference(layer, x, b)
    assert_float32_close(without, ref, exact)
    tol = float32_tolerance(ref, exact)
    if name != "f32" and cpu_kernels() is not None:  # int kernels round the activations to int8
        tol = tol + q8_activation_bound(x, layer.dequantize())
    assert ((with_kernels.double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_within_half_a_step(group):
    w, _ = weights(64, 256)
    layer = Int4Linear.from_float(w, None, group)
    deq = layer.dequantize().view(64, 256 // group, group)
    step = layer.scales.float()[..., None]
    err = (deq - w.view(64, 256 // group, group)).abs()
    # Scale and minimum are float16 (half an ulp is 2^-11 relative): the minimum's rounding, or
    # the scale's times the top code 15, can add to the half step at a group's ends.
    f16 = 2.0**-11 * (15 * step + layer.mins.float()[..., None].abs())
    assert (err <= step / 2 + f16 + 4 * F32_EPS).all()
    # every group's minimum is representable: only its float16 rounding is lost
    lo = w.view(64, -1, group).amin(-1)
    torch.testing.assert_close(deq.amin(-1), lo, rtol=2.0**-11, atol=0)


def test_int8_error_is_within_half_a_step():
    w, _ = weights()
    layer = Int8Linear.from_float(w)
    # half a step, plus float32 rounding of code * scale (|w| < 0.3, so < 4e-8)
    assert ((layer.dequantize() - w).abs() <= layer.scale[:, None] / 2 + 1e-7).all()


def test_tiled_int8_layout_gives_the_same_results_and_saves_plain_codes(monkeypatch):
    w, b = weights(200, 256)
    plain = Int8Linear.from_float(w, b)
    tiled = Int8Linear.from_float(w, b).tile()
    assert tiled.tiled and not torch.equal(tiled.qweight, plain.qweight)
    assert torch.equal(tiled.weight_codes(), plain.qweight)
    assert torch.equal(tiled.state_dict()["qweight"], plain.qweight)
    assert torch.equal(tiled.dequantize(), plain.dequantize())
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    assert torch.equal(tiled(x), plain(x))  # same codes, same instruction sequence per row
    assert torch.equal(tiled(x[:1]), plain(x[:1]))
    fused = Int8Linear.concat([tiled, plain])  # concat reads the plain codes
    # the same codes and scales, each output row computed alone: the same floats
    torch.testing.assert_close(fused(x), torch.cat([plain(x), plain(x)], dim=-1), rtol=0, atol=0)
    # a row count that is not a whole number of tiles stays row-major
    assert not Int8Linear.from_float(*weights(202, 256)).tile().tiled
    monkeypatch.setattr("qwenlm.quant.linear.cpu_kernels", lambda: None)
    assert_float32_close(tiled(x), *reference(plain, x, b))


@pytest.mark.parametrize("cls", [Int8Linear, lambda w, b: Int4Linear.from_float(w, b, 32)])
def test_concat_equals_separate_layers(cls):
    make = cls.from_float if hasattr(cls, "from_float") else cls
    parts = [make(*weights(n, 128, seed=n)) for n in (64, 32, 32)]
    fused = type(parts[0]).concat(parts)
    x = torch.randn(1, 128)
    # the same codes and scales, each output row computed alone: the same floats
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=0)


def test_bad_shapes_and_modes_are_reported():
    with pytest.raises(ValueError, match="multiple of 64"):
        Int4Linear.from_float(torch.randn(4, 96), None, 32)
    with pytest.raises(QuantizationError, match="unknown quantization mode"):
        quantize(tiny_model(), "int3")
    with pytest.raises(QuantizationError, match="group size"):
        quantize(tiny_model(), "int4", group_size=48)


def test_int8_embedding():
    w, _ = weights(50, 64)
    emb = Int8Embedding.from_float(w)
    ids = torch.tensor([[0, 7, 49]])
    # half a step, plus float32 rounding of code * scale
    assert (emb(ids)[0] - w[[0, 7, 49]]).abs().max() <= emb.scale.max() / 2 + 1e-7


INT4_CONFIG = dict(intermediate_size=128)


@pytest.mark.parametrize("mode", ["f32", "int8", "int4"])
def test_quantized_model_tracks_the_float_model(mode):
    config = tiny_config(**INT4_CONFIG)
    ref = tiny_model(config)
    q = quantize(tiny_model(config), mode)
    x = torch.arange(30).view(1, -1) % 300
    with torch.no_grad():
        a, b = ref(x), q(x)
    if mode == "f32":  # float32 weights, the kernels' summation order
        assert_float32_close(b, a, float64_logits(ref, x))
    else:
        # int8 (a step of 1/127 of each row's largest weight) and int4 (1/15 of a group's range)
        # errors compound through the layers of a random model with large activations: loose
        # bounds, with next-token agreement below; the real model's perplexity is the check.
        rel = ((a - b).abs().max() / a.abs().max()).item()
        assert rel < {"int8": 0.1, "int4": 0.5}[mode], rel
    # the quantized model predicts mostly the same next tokens
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > {"f32": 0.99, "int8": 0.8, "int4": 0.5}[
        mode
    ]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_load_quantized_equals_quantizing_the_float_model(tmp_path, mode, monkeypatch):
    config = tiny_config(**INT4_CONFIG)
    path = tmp_path / "m.gguf"
    written = write_tiny_gguf(path, config)
    monkeypatch.setattr("qwenlm.quant._CHUNK_BYTES", 64 * 4 * 37)  # force many row slices
    with open_checkpoint(path) as ck:
        direct = load_quantized(ck, mode)
    via_float = quantize(build_model(config, written.items()), mode)
    for (n1, b1), (n2, b2) in zip(
        direct.state_dict().items(), via_float.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(b1, b2), n1


def test_load_quantized_ties_the_head_when_the_file_has_none(tmp_path):
    config = tiny_config(**INT4_CONFIG)
    path = tmp_path / "m.gguf"
    written = write_tiny_gguf(path, config, drop=("lm_head.weight",))
    with open_checkpoint(path) as ck:
        model = load_quantized(ck, "int8")
    head, want = model.lm_head, written["model.embed_tokens.weight"]
    assert ((head.dequantize() - want).abs() <= head.scale[:, None] / 2 + 1e-7).all()


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tied_model_holds_one_int8_table_for_embedding_and_head(tmp_path, mode):
    config = tiny_config(**INT4_CONFIG, tie_word_embeddings=True)
    path = tmp_path / "m.gguf"
    written = write_tiny_gguf(path, config)
    with open_checkpoint(path) as ck:
        model = load_quantized(ck, mode)
    emb, head = model.model.embed_tokens, model.lm_head
    assert emb.qweight.data_ptr() == head.qweight.data_ptr()
    ids = torch.tensor([[0, 5, 7, 250, config.vocab_size - 1]])
    before = emb(ids)
    # within half an int8 step (plus float32 rounding) of the written rows
    step = emb.scale[ids][..., None]
    assert ((before - written["model.embed_tokens.weight"][ids]).abs() <= step / 2 + 1e-7).all()
    plain = emb.state_dict()["qweight"].clone()
    model.fuse_projections()
    assert accelerate(model)  # tiles the head's codes in place
    assert head.tiled and emb.tiled and emb.qweight.data_ptr() == head.qweight.data_ptr()
    assert torch.equal(emb(ids), before)
    assert torch.equal(emb.state_dict()["qweight"], plain)
    assert torch.equal(emb.weight, head.dequantize())


def test_qwenlm_load_quant_modes_generate(tmp_path):
    config = tiny_config(**INT4_CONFIG)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, config)
    outs = {}
    for quant in ("none", "f32", "int8", "int4"):
        m = qwenlm.load(path, quant=quant)
        outs[quant] = m.generate("hello", temperature=0, max_new_tokens=8, ignore_eos=True)
        assert m.weight_format.startswith(quant if quant != "none" else "float32")
    # f32 kernels follow the reference path closely enough to pick the same greedy tokens
    assert outs["f32"] == outs["none"]
