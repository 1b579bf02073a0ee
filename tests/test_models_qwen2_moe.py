"""Qwen2-MoE against transformers' Qwen2MoeForCausalLM on tiny random configs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_VOCAB, assert_float32_close, float64_logits, random_ids, write_hf_tokenizer

import qwenlm
from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError
from qwenlm.generation.cache import make_cache
from qwenlm.models import build_model
from qwenlm.models.qwen2_moe import SparseMoeBlock, load_balancing_loss
from qwenlm.weights import safetensors as st_format

transformers = pytest.importorskip("transformers")

MOE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    decoder_sparse_step=2,
)


def hf_moe(folder, seed: int = 0, **overrides):
    """A random transformers Qwen2-MoE saved as a Hugging Face folder (with a tokenizer)."""
    torch.manual_seed(seed)
    hf = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**{**MOE, **overrides}))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "mlp.gate.weight" in name or "shared_expert_gate" in name:
                p.copy_(0.5 * torch.randn_like(p))  # routers that make real choices
    hf.eval().save_pretrained(folder)
    write_hf_tokenizer(folder)
    return hf


def ours_from(folder):
    config = ModelConfig.from_json_file(folder / "config.json")
    return build_model(config, st_format.iter_tensors(folder))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": True, "mlp_only_layers": [3], "decoder_sparse_step": 1},
        {"num_experts_per_tok": 3, "tie_word_embeddings": True},
    ],
)
def test_logits_match_transformers_qwen2_moe(tmp_path, overrides):
    hf = hf_moe(tmp_path, **overrides)
    ours = ours_from(tmp_path)
    c = ours.config
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers]
    assert sparse == [c.is_sparse_layer(i) for i in range(c.num_hidden_layers)]
    assert any(sparse) and not all(sparse)
    x = random_ids(48, seed=3, vocab=TINY_VOCAB)
    with torch.no_grad():
        expected, exact = hf(x).logits, float64_logits(hf, x)
        # within float32 noise of transformers in float64 (see helpers.assert_float32_close)
        assert_float32_close(ours(x), expected, exact)
        # prefill + token-by-token decode through the KV cache equals the full forward
        cache = make_cache(ours)
        steps = [ours(x[:, :20], cache)] + [ours(x[:, t : t + 1], cache) for t in range(20, 48)]
        assert_float32_close(torch.cat(steps, 1), expected, exact)


def test_sparse_step_2_and_routing_is_grouped(tmp_path):
    hf_moe(tmp_path)
    ours = ours_from(tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in ours.model.layers]
    assert kinds == ["MLP", "SparseMoeBlock", "MLP", "SparseMoeBlock"]
    block = ours.model.layers[1].mlp
    calls = []
    hooks = [
        e.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0])) for e in block.experts
    ]
    with torch.no_grad():
        ours(random_ids(40, vocab=TINY_VOCAB))
    for h in hooks:
        h.remove()
    # each expert runs at most once per forward, on all of its tokens together
    assert len(calls) <= block.num_experts and sum(calls) == 40 * block.top_k


def test_aux_loss_matches_transformers_and_reaches_router_gradients(tmp_path):
    hf = hf_moe(tmp_path)
    ours = ours_from(tmp_path)
    x = random_ids(32, seed=1, vocab=TINY_VOCAB)
    with torch.no_grad():
        out = hf(x, output_router_logits=True)
        logits = ours.router_logits(x)
    got = load_balancing_loss(logits, ours.config.num_experts, ours.config.num_experts_per_tok)
    # One scalar from ~200 float32 router probabilities summed in another order than
    # transformers: rounding is ~eps * sqrt(200) = 2e-6 relative; 1e-5 leaves margin.
    torch.testing.assert_close(got, out.aux_loss, rtol=1e-5, atol=1e-6)

    # In training mode the block adds coef * aux to the gradient with no change to the output.
    for p in ours.parameters():
        p.requires_grad_(True)
    ours.train()
    ours.zero_grad()
    ours(x).logsumexp(-1).sum().backward()
    with_aux = ours.model.layers[1].mlp.gate.weight.grad.clone()
    for layer in ours.model.layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.aux_coef = 0.0
    coef = ours.config.router_aux_loss_coef
    # explicit: the same gradient as backpropagating lm + coef * (per-layer aux)
    hs = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o: hs.append(o))
        for layer in ours.model.layers
        if isinstance(layer.mlp, SparseMoeBlock)
    ]
    ours.zero_grad()
    lm = ours(x).logsumexp(-1).sum()
    for h in hooks:
        h.remove()
    total = lm + coef * sum(load_balancing_loss([o], 6, 2) for o in hs)
    total.backward()
    # The same sums, only the aux term joins the graph elsewhere: float32's default tolerance.
    torch.testing.assert_close(ours.model.layers[1].mlp.gate.weight.grad, with_aux)
    assert not torch.allclose(with_aux, torch.zeros_like(with_aux))


def test_moe_folder_loads_and_generates_through_qwenlm_load(tmp_path):
    hf = hf_moe(tmp_path)
    x = random_ids(24, seed=2, vocab=TINY_VOCAB)
    with torch.no_grad():
        expected, exact = hf(x).logits[0], float64_logits(hf, x)[0]
    m = qwenlm.load(tmp_path, quant="none", device="cpu")
    assert m.config.model_type == "qwen2_moe"
    assert_float32_close(m.logits(x[0].tolist()), expected, exact)
    text = m.generate("hello", max_new_tokens=8, temperature=0, ignore_eos=True)
    assert isinstance(text, str)
    # the quantized CPU path builds and runs too
    q = qwenlm.load(tmp_path, quant="int8", device="cpu")
    assert q.generate("hello", max_new_tokens=4, temperature=0, ignore_eos=True) is not None


def test_bad_moe_config_is_one_clear_error(tmp_path):
    hf_moe(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="num_experts_per_tok 9 exceeds num_experts 6"):
        ModelConfig.from_hf({**cfg, "num_experts_per_tok": 9})
    assert ModelConfig.from_hf(cfg).to_hf()["architectures"] == ["Qwen2MoeForCausalLM"]
    assert ModelConfig.from_hf(ModelConfig.from_hf(cfg).to_hf()) == ModelConfig.from_hf(cfg)
