"""GGUF files of the qwen (Qwen1), qwen2moe, qwen3 and qwen3moe architectures, and rope scaling
metadata, against their Hugging Face-folder twins.

Each GGUF is written by the test with gguf's GGUFWriter, its tensor names taken from gguf's own
name map (``get_tensor_name_map``, what llama.cpp's converter uses) and experts stacked into one
(n_expert, rows, cols) tensor as the converter does, so the files are built independently of
qwenlm's reader. Logits must equal the twin's (and transformers') to 1e-5 in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import gguf
import pytest
import torch
from helpers import (
    QWEN1,
    QWEN3,
    QWEN_TEMPLATE,
    TINY_VOCAB,
    assert_float32_close,
    float64_logits,
    random_hf_model,
    random_ids,
    random_state_dict,
    tiny_config,
    tiny_gguf_writer,
    write_qwen1_folder,
)
from safetensors.torch import load_file

import qwenlm
from qwenlm.config import ModelConfig, _gguf_rope_scaling
from qwenlm.errors import CheckpointError
from qwenlm.generation.cache import make_cache
from qwenlm.models import build_model
from qwenlm.models.qwen2_moe import SparseMoeBlock
from qwenlm.weights import open_checkpoint
from qwenlm.weights import safetensors as st_format
from qwenlm.weights.qwen1 import qwen1_config

transformers = pytest.importorskip("transformers")

QWEN3_TEMPLATE = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"

MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)
QWEN2 = {k: v for k, v in QWEN3.items() if k != "head_dim"}  # hidden / heads
TWINS = {
    # GGUF architecture: (transformers classes, config); llama.cpp runs experts in every layer
    # and renormalises the chosen experts' weights for qwen3moe only.
    "qwen2moe": (
        ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
        dict(QWEN2, **MOE, shared_expert_intermediate_size=48, norm_topk_prob=False),
    ),
    "qwen3": (("Qwen3Config", "Qwen3ForCausalLM"), QWEN3),
    "qwen3moe": (
        ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        dict(QWEN3, **MOE, norm_topk_prob=True),
    ),
}
_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")


def hf_twin(folder, arch: str, seed: int = 0):
    """A random transformers model of ``arch``'s family saved as an HF folder; its tensors."""
    (cfg_cls, model_cls), cfg = TWINS[arch]
    config = getattr(transformers, cfg_cls)(**cfg)
    hf = random_hf_model(folder, getattr(transformers, model_cls), config, seed)
    return hf, load_file(str(folder / "model.safetensors"))


def write_gguf(
    path,
    arch: str,
    config: ModelConfig,
    sd: dict[str, torch.Tensor],
    *,
    extra=None,
    qtype: str = "F32",
    gate_as_vector: bool = True,
    template: str = QWEN_TEMPLATE,
) -> None:
    """``sd`` (HF or Qwen1 names) as a GGUF of ``arch``, named by gguf's own tensor map."""
    w = tiny_gguf_writer(path, arch, config, template)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if config.is_moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        if config.shared_expert_intermediate_size:
            w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if extra is not None:
        extra(w)
    model_arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)

    def add(name: str, t: torch.Tensor) -> None:
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        arr = t.float().numpy()
        if "shexp" in target and "gate_inp" in target and gate_as_vector:
            arr = arr.reshape(-1)  # llama.cpp's shape for the shared expert's gate
        if arr.ndim >= 2 and qtype != "F32":
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(target, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(target, arr)

    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in sd.items():
        if m := _EXPERT_RE.fullmatch(name):
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = t
        elif not name.endswith("inv_freq"):
            add(name, t)
    for (bid, proj), by_expert in experts.items():
        stacked = torch.stack([by_expert[e] for e in range(len(by_expert))])
        add(f"model.layers.{bid}.mlp.experts.{proj}.weight", stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def from_gguf(path):
    with open_checkpoint(path) as ckpt:
        return build_model(ckpt.config, ckpt.tensors())


def from_folder(folder):
    return build_model(
        ModelConfig.from_json_file(folder / "config.json"), st_format.iter_tensors(folder)
    )


def assert_same_logits(
    ours, expected: torch.Tensor, exact: torch.Tensor, x: torch.Tensor, split: int = 15
) -> None:
    """``ours`` gives the reference's float32 logits ``expected`` of ``x``, up to float32 noise
    against their float64 ``exact`` (helpers.assert_float32_close), whole and through the cache."""
    with torch.no_grad():
        assert_float32_close(ours(x), expected, exact)
        cache = make_cache(ours)
        steps = [ours(x[:, :split], cache)]
        steps += [ours(x[:, t : t + 1], cache) for t in range(split, x.shape[1])]
    assert_float32_close(torch.cat(steps, 1), expected, exact)


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen3", "qwen3moe"])
def test_gguf_equals_its_hf_folder_twin(tmp_path, arch):
    hf, sd = hf_twin(tmp_path / "hf", arch)
    twin = from_folder(tmp_path / "hf")
    write_gguf(tmp_path / "m.gguf", arch, twin.config, sd)
    ours = from_gguf(tmp_path / "m.gguf")
    c = ours.config
    assert c.model_type == twin.config.model_type and c.head_dim == twin.config.head_dim
    if c.is_moe:
        assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers)
        assert c.norm_topk_prob == (arch == "qwen3moe")
    x = random_ids(40, seed=4, vocab=TINY_VOCAB)
    with torch.no_grad():
        expected, exact = hf(x).logits, float64_logits(hf, x)
        assert_float32_close(twin(x), expected, exact)
    assert_same_logits(ours, expected, exact, x)


def test_qwen2moe_shared_expert_gate_stored_as_matrix_or_vector(tmp_path):
    hf, sd = hf_twin(tmp_path / "hf", "qwen2moe", seed=1)
    config = ModelConfig.from_json_file(tmp_path / "hf" / "config.json")
    x = random_ids(24, seed=5, vocab=TINY_VOCAB)
    with torch.no_grad():
        expected, exact = hf(x).logits, float64_logits(hf, x)
    for as_vector in (True, False):
        path = tmp_path / f"m{as_vector}.gguf"
        write_gguf(path, "qwen2moe", config, sd, gate_as_vector=as_vector)
        with torch.no_grad():
            assert_float32_close(from_gguf(path)(x), expected, exact)


def test_moe_gguf_loads_through_qwenlm_load_and_reads_experts_by_rows(tmp_path):
    _, sd = hf_twin(tmp_path / "hf", "qwen3moe", seed=2)
    config = ModelConfig.from_json_file(tmp_path / "hf" / "config.json")
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen3moe", config, sd, qtype="Q8_0")
    with open_checkpoint(path) as ckpt:
        shapes = ckpt.shapes()
        name = "model.layers.1.mlp.experts.4.down_proj.weight"
        assert shapes[name] == tuple(sd[name].shape) == (64, 32)
        whole = ckpt.read(name)
        torch.testing.assert_close(ckpt.read(name, (10, 30)), whole[10:30], rtol=0, atol=0)
        # Q8_0 keeps each weight within half a step (absmax / 127 per 32) of the original
        torch.testing.assert_close(whole, sd[name], rtol=0, atol=float(sd[name].abs().max()) / 127)
    # The quantized CPU path converts every expert slice by slice, as from the HF folder.
    x = random_ids(20, seed=6, vocab=TINY_VOCAB)[0].tolist()
    for quant in ("none", "int8"):
        m = qwenlm.load(path, quant=quant, device="cpu")
        assert m.config.model_type == "qwen3_moe"
        assert m.generate("hello", max_new_tokens=4, temperature=0, ignore_eos=True) is not None
    f = qwenlm.load(path, quant="none", device="cpu")
    q = qwenlm.load(path, quant="int8", device="cpu")
    assert torch.nn.functional.cosine_similarity(q.logits(x), f.logits(x)).min() > 0.99


def qwen1_gguf(tmp_path, cfg: dict):
    sd = write_qwen1_folder(tmp_path / "hf", cfg)
    twin = qwen1_config(cfg)
    # Qwen1's converter states the two up projections' width together, as its config does.
    stated = dataclasses.replace(twin, intermediate_size=cfg["intermediate_size"])
    write_gguf(tmp_path / "q1.gguf", "qwen", stated, sd)
    return tmp_path / "q1.gguf"


def test_qwen1_gguf_equals_its_qwen1_folder_twin(tmp_path):
    # llama.cpp's Qwen1 has neither dynamic NTK nor LogN attention: the twin has them off.
    cfg = {**QWEN1, "use_dynamic_ntk": False, "use_logn_attn": False}
    path = qwen1_gguf(tmp_path, cfg)
    folder = qwenlm.load(tmp_path / "hf", quant="none", device="cpu")
    gguf_model = qwenlm.load(path, quant="none", device="cpu")
    c = gguf_model.config
    assert (c.intermediate_size, c.num_key_value_heads) == (96, 4)
    x = random_ids(40, seed=7, vocab=269)
    with torch.no_grad():
        expected = folder.model(x)
    assert_same_logits(gguf_model.model, expected, float64_logits(folder.model, x), x)
    # Qwen1's chat format and stops, as from its folder; the int8 path splits the fused QKV
    # slice by slice and gives the folder's int8 model.
    assert type(gguf_model.template) is type(folder.template)
    assert gguf_model.generation_defaults["stop_token_ids"]
    qf = qwenlm.load(tmp_path / "hf", quant="int8", device="cpu")
    qg = qwenlm.load(path, quant="int8", device="cpu")
    # the same int8 codes (the fused QKV split row by row either way) through the same kernels
    torch.testing.assert_close(qg.logits(x[0]), qf.logits(x[0]), rtol=0, atol=0)


# -- rope scaling ---------------------------------------------------------------------------

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def hf_qwen2(config: ModelConfig, rope_parameters: dict, sd: dict):
    """transformers' Qwen2 with ``sd`` (a copy of the config's dicts: transformers edits them)."""
    hf_config = {**json.loads(json.dumps(config.to_hf())), "rope_parameters": rope_parameters}
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf_config)).eval()
    hf.load_state_dict(sd, strict=True)
    return hf


def yarn_gguf(path, config: ModelConfig, sd, **keys) -> None:
    def extra(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)
        for key, value in keys.items():
            getattr(w, f"add_rope_scaling_{key}")(value)

    write_gguf(path, "qwen2", config, sd, extra=extra)


def test_yarn_gguf_runs_with_yarn(tmp_path):
    config = tiny_config(rope_scaling=dict(YARN), max_position_embeddings=256)
    sd = random_state_dict(config, seed=1, std=0.1)
    hf = hf_qwen2(config, {**YARN, "rope_theta": 1e4}, sd)
    yarn_gguf(tmp_path / "yarn.gguf", config, sd)
    ours = from_gguf(tmp_path / "yarn.gguf")
    assert ours.config.rope_scaling == YARN
    x = random_ids(200, seed=2, vocab=TINY_VOCAB)
    with torch.no_grad():
        expected, exact = hf(x).logits, float64_logits(hf, x)
        folder_twin = build_model(config, sd.items())
        assert_float32_close(folder_twin(x), expected, exact)
        assert_same_logits(ours, expected, exact, x, split=150)
        # the test can fail: the same weights without YaRN give other logits
        plain = build_model(dataclasses.replace(config, rope_scaling=None), sd.items())
        assert (plain(x) - expected).abs().max() > 0.1


def test_gguf_rope_scaling_keys_map_onto_config_json_blocks(tmp_path):
    def meta(**keys):
        return {f"qwen2.rope.scaling.{k}": v for k, v in keys.items()}

    assert _gguf_rope_scaling("qwen2", {}) is None
    assert _gguf_rope_scaling("qwen2", meta(type="none")) is None
    assert _gguf_rope_scaling("qwen2", meta(type="linear", factor=2.0)) == {
        "rope_type": "linear",
        "factor": 2.0,
    }
    got = _gguf_rope_scaling(
        "qwen2",
        meta(type="yarn", factor=4.0, original_context_length=32768, yarn_beta_fast=16.0,
             yarn_beta_slow=2.0, attn_factor=1.5, yarn_ext_factor=-1.0),
    )  # fmt: skip
    # llama.cpp scales cos/sin by attn_factor * (1 + 0.1 ln factor): HF's attention_factor
    assert got == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": pytest.approx(1.5 * (1 + 0.1 * math.log(4.0))),
    }
    for bad in (
        meta(type="longrope", factor=4.0),
        meta(type="yarn"),
        meta(type="yarn", factor=4.0, yarn_log_multiplier=0.1),
        meta(type="yarn", factor=4.0, yarn_ext_factor=0.5),
    ):
        with pytest.raises(CheckpointError, match=r"rope scaling|rope\.scaling"):
            _gguf_rope_scaling("qwen2", bad)
    # a YaRN GGUF with beta keys runs with them (and transformers agrees)
    config = tiny_config(max_position_embeddings=256)
    sd = random_state_dict(config, seed=3, std=0.1)
    yarn_gguf(tmp_path / "b.gguf", config, sd, yarn_beta_fast=16.0, yarn_beta_slow=2.0)
    block = {**YARN, "beta_fast": 16.0, "beta_slow": 2.0}
    hf = hf_qwen2(config, {**block, "rope_theta": 1e4}, sd)
    x = random_ids(150, seed=3, vocab=TINY_VOCAB)
    with torch.no_grad():
        assert_float32_close(from_gguf(tmp_path / "b.gguf")(x), hf(x).logits, float64_logits(hf, x))


def test_partial_rotary_and_unknown_arch_are_one_clear_error(tmp_path):
    config = tiny_config()
    sd = random_state_dict(config)
    write_gguf(
        tmp_path / "p.gguf", "qwen2", config, sd, extra=lambda w: w.add_rope_dimension_count(8)
    )
    with pytest.raises(CheckpointError, match="partial rotary"):
        open_checkpoint(tmp_path / "p.gguf")
    meta = {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'llama'"):
        ModelConfig.from_gguf(meta)


def test_qwen3_gguf_chat_template_renders_with_enable_thinking(tmp_path):
    # Qwen3's published template, as Qwen3 GGUFs embed it; transformers renders the reference.
    from transformers.utils.chat_template_utils import render_jinja_template

    source = QWEN3_TEMPLATE.read_text(encoding="utf-8")
    _, sd = hf_twin(tmp_path / "hf", "qwen3")
    config = ModelConfig.from_json_file(tmp_path / "hf" / "config.json")
    write_gguf(tmp_path / "q3.gguf", "qwen3", config, sd, template=source)
    m = qwenlm.load(tmp_path / "q3.gguf", quant="none", device="cpu")
    assert m.template.source == source
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nsome thought\n</think>\n\nhello"},
        {"role": "user", "content": "and now?"},
    ]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        want = render_jinja_template(
            conversations=[chat], chat_template=source, add_generation_prompt=True, **kwargs
        )[0][0]
        assert m.template.render(chat, **kwargs) == want
    assert m.template.render(chat, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert "some thought" not in m.template.render(chat)  # earlier turns drop their thinking
