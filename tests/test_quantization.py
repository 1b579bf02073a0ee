"""Quantized layers and native kernels: agreement with dequantized references, exact rows."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, tiny_model, write_tiny_gguf

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


@needs_kernels
@pytest.mark.parametrize("name, make", LAYERS)
def test_kernel_matches_dequantized_matmul(name, make):
    w, b = weights()
    layer = make(w, b)
    g = torch.Generator().manual_seed(1)
    for M in (1, 3, 16, 17, 40):  # 17+ rows take the dequantize + matmul path
        x = torch.randn(M, w.shape[1], generator=g)
        ref = x @ layer.dequantize().T + b
        got = layer(x)
        # int kernels also quantize the activations to int8 per block of 32 (as GGUF's Q8_0):
        # a relative error of a few 1e-3 on outputs of this size.
        tol = 1e-5 if name == "f32" or M > 16 else 2e-2
        assert (got - ref).abs().max() <= tol * ref.abs().max(), (name, M)


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
    ref = x @ layer.dequantize().T + b
    torch.testing.assert_close(without, ref)
    assert (with_kernels - without).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_within_half_a_step(group):
    w, _ = weights(64, 256)
    layer = Int4Linear.from_float(w, None, group)
    deq = layer.dequantize().view(64, 256 // group, group)
    step = layer.scales.float()[..., None]
    err = (deq - w.view(64, 256 // group, group)).abs()
    assert (err <= step / 2 + 1e-3).all()
    # every group's extremes are representable
    assert torch.allclose(deq.amin(-1), w.view(64, -1, group).amin(-1), atol=1e-3)


def test_int8_error_is_within_half_a_step():
    w, _ = weights()
    layer = Int8Linear.from_float(w)
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
    torch.testing.assert_close(fused(x), torch.cat([plain(x), plain(x)], dim=-1))
    # a row count that is not a whole number of tiles stays row-major
    assert not Int8Linear.from_float(*weights(202, 256)).tile().tiled
    monkeypatch.setattr("qwenlm.quant.linear.cpu_kernels", lambda: None)
    torch.testing.assert_close(tiled(x), x @ plain.dequantize().T + b)


@pytest.mark.parametrize("cls", [Int8Linear, lambda w, b: Int4Linear.from_float(w, b, 32)])
def test_concat_equals_separate_layers(cls):
    make = cls.from_float if hasattr(cls, "from_float") else cls
    parts = [make(*weights(n, 128, seed=n)) for n in (64, 32, 32)]
    fused = type(parts[0]).concat(parts)
    x = torch.randn(1, 128)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1))


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
    rel = ((a - b).abs().max() / a.abs().max()).item()
    # Random tiny models have large activations; the real model's perplexity is the real check.
    assert rel < {"f32": 1e-5, "int8": 0.1, "int4": 0.5}[mode], rel
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
    torch.testing.assert_close(
        model.lm_head.dequantize(), written["model.embed_tokens.weight"], atol=0.01, rtol=0
    )


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
    torch.testing.assert_close(before, written["model.embed_tokens.weight"][ids], atol=0.01, rtol=0)
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
