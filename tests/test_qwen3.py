"""Qwen3 and Qwen3-MoE against transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM.

Tiny random configs with a head_dim unlike hidden_size / heads, q/k norms away from 1, and the
MoE switches (norm_topk_prob, decoder_sparse_step, mlp_only_layers); logits must equal
transformers' to 1e-5 (float32, the same operations in a different order), and prefill plus
cached decode must equal the full forward.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    QWEN3,
    QWEN3_MOE,
    TINY_VOCAB,
    assert_float32_close,
    float64_logits,
    random_hf_model,
    random_ids,
)

import qwenlm
from qwenlm.config import ModelConfig
from qwenlm.generation.cache import make_cache
from qwenlm.generation.fastpath import KernelLayer
from qwenlm.models import build_model
from qwenlm.models.qwen2_moe import SparseMoeBlock
from qwenlm.weights import safetensors as st_format

transformers = pytest.importorskip("transformers")


def hf_qwen3(folder, seed: int = 0, moe: bool = False, **overrides):
    """A random transformers Qwen3 (or Qwen3-MoE) saved as a Hugging Face folder."""
    if moe:
        cfg = transformers.Qwen3MoeConfig(**{**QWEN3_MOE, **overrides})
        return random_hf_model(folder, transformers.Qwen3MoeForCausalLM, cfg, seed)
    cfg = transformers.Qwen3Config(**{**QWEN3, **overrides})
    return random_hf_model(folder, transformers.Qwen3ForCausalLM, cfg, seed)


def ours_from(folder):
    config = ModelConfig.from_json_file(folder / "config.json")
    return build_model(config, st_format.iter_tensors(folder))


def assert_matches(hf, ours, n: int = 40, split: int = 15) -> None:
    x = random_ids(n, seed=3, vocab=TINY_VOCAB)
    with torch.no_grad():
        # within float32 noise of transformers in float64 (see helpers.assert_float32_close)
        expected, exact = hf(x).logits, float64_logits(hf, x)
        assert_float32_close(ours(x), expected, exact)
        cache = make_cache(ours)
        steps = [ours(x[:, :split], cache)]
        steps += [ours(x[:, t : t + 1], cache) for t in range(split, n)]
        assert_float32_close(torch.cat(steps, 1), expected, exact)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "num_key_value_heads": 4}],
)
def test_logits_match_transformers_qwen3(tmp_path, overrides):
    hf = hf_qwen3(tmp_path, **overrides)
    ours = ours_from(tmp_path)
    c = ours.config
    assert (c.model_type, c.head_dim, c.qk_norm) == ("qwen3", 32, True)
    attn = ours.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (attn.o_proj.bias is not None)
    assert (attn.q_proj.bias is not None) == bool(overrides.get("attention_bias"))
    assert_matches(hf, ours)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": True, "mlp_only_layers": [2]},
        {"decoder_sparse_step": 2, "num_experts_per_tok": 3, "tie_word_embeddings": True},
    ],
)
def test_logits_match_transformers_qwen3_moe(tmp_path, overrides):
    hf = hf_qwen3(tmp_path, moe=True, **overrides)
    ours = ours_from(tmp_path)
    c = ours.config
    assert c.model_type == "qwen3_moe" and c.num_experts == 6  # written as num_local_experts
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers]
    assert sparse == [c.is_sparse_layer(i) for i in range(c.num_hidden_layers)]
    assert any(sparse)
    blocks = [layer.mlp for layer in ours.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    assert all(block.shared_expert is None for block in blocks)
    assert_matches(hf, ours)


def greedy_by_full_forward(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_qwen3_loads_and_generates_through_qwenlm_load(tmp_path, moe, quant):
    hf = hf_qwen3(tmp_path, moe=moe)
    m = qwenlm.load(tmp_path, quant=quant, device="cpu")
    x = random_ids(24, seed=2, vocab=TINY_VOCAB)[0].tolist()
    if quant == "none":
        with torch.no_grad():
            expected = hf(torch.tensor([x])).logits[0]
        exact = float64_logits(hf, torch.tensor([x]))[0]
        assert_float32_close(m.logits(x), expected, exact)
    # The native per-layer decode step has no q/k norms: Qwen3 layers must not take it.
    assert not any(isinstance(layer, KernelLayer) for layer in m.model.model.layers)
    # The engine's cached decode picks the tokens that repeated full forwards pick.
    got = m.generate_chunks(x[:8], max_new_tokens=8, temperature=0, ignore_eos=True)
    tokens = [t for chunk in got for t in chunk.token_ids]
    assert tokens == greedy_by_full_forward(m.model, x[:8], 8)


def test_qwen3_config_defaults_and_round_trip(tmp_path):
    hf_qwen3(tmp_path, moe=True)
    back = ModelConfig.from_json_file(tmp_path / "config.json")
    assert back.to_hf()["architectures"] == ["Qwen3MoeForCausalLM"]
    assert ModelConfig.from_hf(back.to_hf()) == back
    # Hugging Face's defaults for keys a config may leave out: head_dim 128, no bias.
    dense = ModelConfig.from_hf({"model_type": "qwen3", "hidden_size": 256})
    assert (dense.head_dim, dense.attention_bias, dense.qk_norm) == (128, False, True)
    # Qwen2's layout is unchanged: a bias on Q, K and V, none on O, no q/k norms.
    q2 = ModelConfig.from_hf({"model_type": "qwen2"})
    assert (q2.attention_bias, q2.qk_norm) == (None, False)
