"""GPTQ and AWQ checkpoints: tiny layers and models packed by the test from known integer weights.

The packing below is written from the formats' definitions (AutoGPTQ's ``QuantLinear.pack``:
inputs packed into int32 words from the lowest bits up, zero points packed along the outputs
and stored minus 1 in the original format; AutoAWQ's ``WQLinear_GEMM.from_linear``: outputs
packed in the order 0 2 4 6 1 3 5 7), with plain numpy bit operations, independently of
qwenlm's unpacking. The reference is ``w = (q - z) * s`` computed in float64.

Tolerances: layers that dequantize in PyTorch (``GroupQuantLinear``) are exact; on Int4Linear
the minimum ``-z * s`` is rounded to float16, at most 2^-11 |z s| a weight, and exact when
z * s fits float16's 11 bits (symmetric GPTQ: z = 8). Products are float32 against float64:
at most K * 2^-24 of sum |x w| (K inputs).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import (
    TINY_VOCAB,
    assert_float32_close,
    float64_logits,
    tiny_config,
    write_hf_tokenizer,
)
from safetensors.torch import save_file

import qwenlm
from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError
from qwenlm.models import build_model, model_class
from qwenlm.quant import QuantizationError, save_quantized
from qwenlm.quant.gptq import (
    ConcatLinear,
    GroupQuantLinear,
    PermutedInput,
    make_layer,
    parse_scheme,
    read_matrix,
)
from qwenlm.quant.linear import SMALL_BATCH, Int4Linear

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: field i of a word holds output AWQ_ORDER[i]


# -- packing, from the formats' definitions ----------------------------------------------------


def pack_rows(vals: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ qweight: rows r*per .. r*per+per-1 of ``vals`` into word row r, lowest bits first."""
    per = 32 // bits
    out = np.zeros((vals.shape[0] // per, vals.shape[1]), dtype=np.uint32)
    for r in range(out.shape[0]):
        for j in range(per):
            out[r] |= vals[r * per + j].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


def pack_cols(vals: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """Columns c*per .. c*per+per-1 into word column c; field i holds column c*per + order[i]."""
    per = 32 // bits
    order = order or list(range(per))
    out = np.zeros((vals.shape[0], vals.shape[1] // per), dtype=np.uint32)
    for c in range(out.shape[1]):
        for i in range(per):
            out[:, c] |= vals[:, c * per + order[i]].astype(np.uint32) << np.uint32(bits * i)
    return out.view(np.int32)


def fp16_scales(rng: np.random.Generator, shape, coarse: bool) -> np.ndarray:
    """Positive float16 scales; ``coarse`` ones have 7 significant bits, so that z * s (z < 16)
    is exact in float16 and Int4Linear's minimum does not round."""
    s = rng.uniform(0.01, 0.05, shape)
    if coarse:
        e = np.floor(np.log2(s))
        s = np.round(s / 2**e * 64) / 64 * 2**e
    return s.astype(np.float16)


def quantized_layer(
    rng: np.random.Generator,
    n: int,
    k: int,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 32,
    act_order: bool = False,
    v1: bool = True,
    sym: bool = False,
    coarse: bool = False,
    bias: bool = False,
    perm: np.ndarray | None = None,
    name: str = "layer",
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """A random layer's tensors in ``method``'s format, and its float64 weight (n, k)."""
    gs = k if group_size == -1 else group_size
    n_groups = -(-k // gs)
    q = rng.integers(0, 1 << bits, (k, n))  # stored (in, out), as both formats hold it
    if sym:
        z = np.full((n_groups, n), 1 << (bits - 1))
    else:  # GPTQ's original format cannot store z = 0 (it keeps z - 1)
        z = rng.integers(1 if (method == "gptq" and v1) else 0, 1 << bits, (n_groups, n))
    s = fp16_scales(rng, (n_groups, n), coarse)
    g_idx = np.arange(k) // gs
    if act_order:
        # GPTQ's act-order: inputs quantized in the order `perm`, groups taken along it.
        perm = perm if perm is not None else rng.permutation(k)
        g_idx = np.empty(k, dtype=np.int64)
        g_idx[perm] = np.arange(k) // gs
    w = (q - z[g_idx]).astype(np.float64) * s[g_idx].astype(np.float64)  # (k, n)
    out: dict[str, torch.Tensor] = {f"{name}.scales": torch.from_numpy(s)}
    if method == "gptq":
        out[f"{name}.qweight"] = torch.from_numpy(pack_rows(q, bits))
        out[f"{name}.qzeros"] = torch.from_numpy(pack_cols(z - 1 if v1 else z, bits))
        out[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    else:
        out[f"{name}.qweight"] = torch.from_numpy(pack_cols(q, 4, AWQ_ORDER))
        out[f"{name}.qzeros"] = torch.from_numpy(pack_cols(z, 4, AWQ_ORDER))
    if bias:
        out[f"{name}.bias"] = torch.from_numpy(rng.normal(0, 0.1, n).astype(np.float16))
    return out, w.T.copy()


def reader(tensors: dict[str, torch.Tensor]):
    """Checkpoint.read's contract: floating tensors as float32, integer ones as stored."""
    return lambda name: (
        tensors[name].float() if tensors[name].is_floating_point() else tensors[name]
    )


def config_for(method: str, bits: int, group_size: int, **extra) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, **extra}
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm",
            "zero_point": True, **extra}  # fmt: skip


def build(tensors, n, k, qcfg, name="layer"):
    s = parse_scheme(qcfg)
    shapes = {key: tuple(v.shape) for key, v in tensors.items()}
    m = read_matrix(reader(tensors), name, shapes, n, k, s)
    bias = tensors.get(f"{name}.bias")
    return make_layer(m, None if bias is None else bias.float(), s)


def min_rounding(layer: torch.nn.Module, w: np.ndarray) -> np.ndarray:
    """Per-weight bound on Int4Linear's error: 2^-11 |z s| (float16 rounding of the minimum)."""
    inner = layer.inner if isinstance(layer, PermutedInput) else layer
    if not isinstance(inner, Int4Linear):
        return np.zeros_like(w)
    mins = inner.mins.double().numpy().repeat(inner.group_size, axis=1)
    bound = np.abs(mins) * 2.0**-11
    if isinstance(layer, PermutedInput):
        out = np.empty_like(bound)
        out[:, layer.perm.numpy()] = bound
        return out
    return bound


# -- layers -------------------------------------------------------------------------------------

LAYERS = [
    # (method, bits, group_size, act_order, v1, sym, expected layer)
    ("gptq", 4, 128, False, True, True, Int4Linear),  # Qwen2.5-*-GPTQ-Int4
    ("gptq", 4, 32, False, True, False, Int4Linear),
    ("gptq", 4, 64, False, False, False, Int4Linear),  # gptq_v2
    ("gptq", 4, -1, False, True, True, Int4Linear),  # one group: groups of 128 alike
    ("gptq", 4, 256, True, True, False, PermutedInput),
    ("gptq", 4, 32, True, True, True, PermutedInput),
    ("gptq", 4, 16, False, True, False, GroupQuantLinear),  # no kernel group of 16
    ("gptq", 8, 128, False, True, True, GroupQuantLinear),  # Qwen2.5-*-GPTQ-Int8
    ("gptq", 8, -1, True, True, False, GroupQuantLinear),
    ("gptq", 8, 64, False, False, False, GroupQuantLinear),
    ("gptq", 2, 64, True, True, False, GroupQuantLinear),
    ("awq", 4, 128, False, False, False, Int4Linear),  # Qwen2.5-*-AWQ
    ("awq", 4, 32, False, False, False, Int4Linear),
    ("awq", 4, -1, False, False, False, Int4Linear),
]


@pytest.mark.parametrize("method,bits,group_size,act_order,v1,sym,kind", LAYERS)
def test_layer_equals_reference_dequantize_then_matmul(
    method, bits, group_size, act_order, v1, sym, kind
):
    rng = np.random.default_rng(bits * 1000 + group_size + 7 * act_order)
    n, k = 48, 512
    tensors, w = quantized_layer(
        rng, n, k, method=method, bits=bits, group_size=group_size, act_order=act_order,
        v1=v1, sym=sym, bias=True,
    )  # fmt: skip
    fmt = {} if method == "awq" else {"checkpoint_format": "gptq" if v1 else "gptq_v2", "sym": sym}
    layer = build(tensors, n, k, config_for(method, bits, group_size, **fmt))
    assert type(layer) is kind
    if isinstance(layer, PermutedInput):
        assert isinstance(layer.inner, Int4Linear)
    # exact in PyTorch, and on Int4Linear for symmetric zero points (8 * s is exact in float16)
    exact = sym or kind is GroupQuantLinear
    bound_w = np.zeros_like(w) if exact else min_rounding(layer, w)
    got_w = layer.dequantize().double().numpy()
    assert np.all(np.abs(got_w - w) <= bound_w), np.abs(got_w - w).max()
    # 32 rows: dequantize and one float32 matrix product
    x = torch.from_numpy(rng.normal(0, 1, (32, k))).float()
    b = tensors["layer.bias"].double().numpy()
    ref = x.double().numpy() @ w.T + b
    abs_xw = np.abs(x.double().numpy()) @ np.abs(w).T
    bound = np.abs(x.double().numpy()) @ bound_w.T + k * 2.0**-24 * (abs_xw + np.abs(b))
    with torch.no_grad():
        y = layer(x).double().numpy()
    assert np.all(np.abs(y - ref) <= bound), (np.abs(y - ref) / (bound + 1e-30)).max()
    # 4 rows: Int4Linear's native kernel, which rounds the activations to int8 in blocks of
    # 32 (at most amax / 254 each); the PyTorch layers compute as above.
    x4 = x[:4]
    with torch.no_grad():
        y4 = layer(x4).double().numpy()
    blocks = np.abs(x4.double().numpy()).reshape(4, k // 32, 32).max(-1) / 254
    act = blocks.repeat(32, axis=1) @ (np.abs(w) + bound_w).T
    assert np.all(np.abs(y4 - ref[:4]) <= bound[:4] + 1.01 * act)


def test_int4_minimum_rounds_to_float16_within_the_stated_bound():
    # Asymmetric zero points with fine scales: the float16 minimum is not exact, and stays
    # within 2^-11 |z s| of it (under 1/128 of a step, z < 16).
    rng = np.random.default_rng(3)
    tensors, w = quantized_layer(rng, 32, 128, method="awq", group_size=64)
    layer = build(tensors, 32, 128, config_for("awq", 4, 64))
    err = np.abs(layer.dequantize().double().numpy() - w)
    assert err.max() > 0  # the rounding is real
    assert np.all(err <= min_rounding(layer, w))
    step = tensors["layer.scales"].double().numpy().T.repeat(64, axis=1)
    assert np.all(err <= step / 128)
    # coarse scales (z * s within float16's precision) are exact
    tensors, w = quantized_layer(rng, 32, 128, method="awq", group_size=64, coarse=True)
    layer = build(tensors, 32, 128, config_for("awq", 4, 64))
    assert np.array_equal(layer.dequantize().double().numpy(), w)


def test_act_order_layers_fuse_by_their_permutation():
    rng = np.random.default_rng(5)
    k, perm = 128, np.random.default_rng(0).permutation(128)
    qcfg = config_for("gptq", 4, 32, desc_act=True)
    same = [
        build(quantized_layer(rng, n, k, act_order=True, perm=perm)[0], n, k, qcfg)
        for n in (32, 16, 16)
    ]
    fused = PermutedInput.concat(same)
    assert isinstance(fused, PermutedInput) and isinstance(fused.inner, Int4Linear)
    other = build(quantized_layer(rng, 16, k, act_order=True)[0], 16, k, qcfg)
    mixed = PermutedInput.concat([same[0], other])
    assert isinstance(mixed, ConcatLinear)
    x = torch.randn(20, k)
    with torch.no_grad():
        # the same codes, one matmul instead of several: float32's default tolerance
        torch.testing.assert_close(fused(x), torch.cat([m(x) for m in same], -1))
        torch.testing.assert_close(mixed(x), torch.cat([same[0](x), other(x)], -1))


def test_bad_checkpoints_are_one_clear_error():
    rng = np.random.default_rng(9)
    tensors, _ = quantized_layer(rng, 32, 128, sym=True, v1=False)
    # a gptq_v2 file read as the original format: its zero points are off by one
    with pytest.raises(CheckpointError, match=r"says sym, but the zero points are \[9\]"):
        build(tensors, 32, 128, config_for("gptq", 4, 32, sym=True))
    with pytest.raises(CheckpointError, match=r"scales has shape \[4, 32\], expected \[2, 32\]"):
        build(tensors, 32, 128, config_for("gptq", 4, 64, checkpoint_format="gptq_v2"))
    bad = dict(tensors, **{"layer.g_idx": torch.full((128,), 7, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match=r"g_idx holds groups outside 0\.\.3"):
        build(bad, 32, 128, config_for("gptq", 4, 32, checkpoint_format="gptq_v2"))
    for qcfg in (
        config_for("gptq", 3, 128),
        config_for("gptq", 4, 128, checkpoint_format="marlin"),
        config_for("awq", 4, 128, version="gemv"),
        config_for("awq", 4, 128, zero_point=False),
        {"quant_method": "bitsandbytes"},
    ):
        with pytest.raises(CheckpointError, match="unsupported"):
            parse_scheme(qcfg)


# -- whole models -------------------------------------------------------------------------------

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_quantized_folder(folder, config: ModelConfig, qcfg: dict, seed: int = 0, **layer_kw):
    """A tiny HF folder whose linear layers are quantized: float tensors stored in float16, as
    the releases store them. Returns the reference float state dict (float32)."""
    rng = np.random.default_rng(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in model_class(config)(config).named_parameters()}
    g = torch.Generator().manual_seed(seed)
    sd = {
        name: ((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(shape, generator=g)).half()
        for name, shape in shapes.items()
    }
    stored, ref = {}, {}
    for name, t in sd.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rsplit(".", 1)[-1] in LINEARS:
            n, k = t.shape
            tensors, w = quantized_layer(rng, n, k, name=module, **layer_kw)
            stored.update(tensors)
            ref[name] = torch.from_numpy(w).float()
        else:
            stored[name] = t
            ref[name] = t.float()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stored.items()}, str(folder / "model.safetensors"))
    hf = {**config.to_hf(), "torch_dtype": "float16", "quantization_config": qcfg}
    (folder / "config.json").write_text(json.dumps(hf))
    write_hf_tokenizer(folder)
    return ref


MODELS = [
    # (name, method, bits, group_size, act_order, sym, coarse)
    ("gptq-int4", "gptq", 4, 32, False, True, False),
    ("gptq-int4-act-order", "gptq", 4, 32, True, True, False),
    ("gptq-int8", "gptq", 8, 32, False, True, False),
    ("gptq-int4-asym-exact", "gptq", 4, 64, False, False, True),
    ("awq", "awq", 4, 32, False, False, True),
]


@pytest.mark.parametrize("label,method,bits,group_size,act_order,sym,coarse", MODELS)
def test_model_folder_loads_and_equals_the_reference_float_model(
    tmp_path, label, method, bits, group_size, act_order, sym, coarse
):
    config = tiny_config(intermediate_size=128)
    extra = {"desc_act": act_order, "sym": sym} if method == "gptq" else {}
    qcfg = config_for(method, bits, group_size, **extra)
    ref_sd = write_quantized_folder(
        tmp_path, config, qcfg, method=method, bits=bits, group_size=group_size,
        act_order=act_order, sym=sym, coarse=coarse,
    )  # fmt: skip
    reference = build_model(config, ref_sd.items())
    m = qwenlm.load(tmp_path, device="cpu")
    assert m.weight_format == f"{method}-int{bits}"
    attn = m.model.model.layers[0]
    attn = getattr(attn, "layer", attn).self_attn.qkv_proj  # fused for inference
    if method == "awq" or (bits == 4 and not act_order):
        assert isinstance(attn, Int4Linear)
    elif act_order:
        assert isinstance(attn, ConcatLinear)  # q, k, v quantized in different orders
    x = torch.randint(0, TINY_VOCAB, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([x]))[0]
    # the same weight values, float32 sums in another order: float32 noise against float64
    exact = float64_logits(reference, torch.tensor([x]))[0]
    assert_float32_close(m.logits(x), expected, exact)
    out = m.generate("hello", max_new_tokens=6, temperature=0, ignore_eos=True)
    assert isinstance(out, str)


def test_moe_gptq_folder_keeps_the_router_in_float(tmp_path):
    # Qwen2-MoE GPTQ releases quantize the experts and keep the routers in float16.
    config = dataclasses.replace(
        tiny_config(intermediate_size=128), model_type="qwen2_moe", num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        decoder_sparse_step=1,
    )  # fmt: skip
    qcfg = config_for("gptq", 4, 32, sym=True)
    ref_sd = write_quantized_folder(tmp_path, config, qcfg, seed=2, sym=True)
    m = qwenlm.load(tmp_path, device="cpu")
    block = m.model.model.layers[0]
    block = getattr(block, "layer", block).mlp
    assert type(block.gate).__name__ == "DenseLinear"
    # Enough tokens that every expert gets more than SMALL_BATCH rows: fewer go to the native
    # kernel, which rounds activations to int8 (compared with its bound in the layer test).
    x = torch.randint(0, TINY_VOCAB, (128,), generator=torch.Generator().manual_seed(2)).tolist()
    rows: list[int] = []
    hooks = [
        e.register_forward_hook(lambda _m, i, _o: rows.append(i[0].shape[0]))
        for layer in m.model.model.layers
        for e in getattr(layer, "layer", layer).mlp.experts
    ]
    got = m.logits(x)
    for h in hooks:
        h.remove()
    assert min(rows) > SMALL_BATCH
    reference = build_model(config, ref_sd.items())
    with torch.no_grad():
        expected = reference(torch.tensor([x]))[0]
    # the same weight values, float32 sums in another order: float32 noise against float64
    assert_float32_close(got, expected, float64_logits(reference, torch.tensor([x]))[0])


def test_gptq_model_cannot_be_saved_as_a_qwenlm_checkpoint(tmp_path):
    config = tiny_config(intermediate_size=128)
    write_quantized_folder(tmp_path / "in", config, config_for("gptq", 4, 32, sym=True), sym=True)
    m = qwenlm.load(tmp_path / "in", device="cpu")
    with pytest.raises(QuantizationError, match="cannot be saved"):
        save_quantized(m.model, tmp_path / "out", tokenizer=m.tokenizer, chat_template=None)
