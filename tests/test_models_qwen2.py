"""The Qwen2 model on tiny random configs: cache consistency and parity with transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    assert_float32_close,
    float64_logits,
    random_ids,
    random_state_dict,
    tiny_config,
    tiny_model,
)

from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError
from qwenlm.generation.cache import KVCache, make_cache
from qwenlm.models import build_model


def float32_and_exact(config=None):
    """The same random weights in float32 (under test) and float64 (the exact reference)."""
    return tiny_model(config), tiny_model(config, dtype=torch.float64)


def prefill_then_decode(model, x: torch.Tensor, prefill: int, cache=None, perturb=None):
    """Logits of ``x`` through the cache: one prefill chunk, then one token per step.

    ``perturb(cache)`` runs between prefill and decode (to check that a bad cache is caught).
    """
    cache = cache if cache is not None else make_cache(model)
    parts = [model(x[:, :prefill], cache)]
    if perturb is not None:
        perturb(cache)
    parts += [model(x[:, t : t + 1], cache) for t in range(prefill, x.shape[1])]
    return torch.cat(parts, dim=1)


def test_full_forward_equals_prefill_plus_cached_decode():
    model, exact_model = float32_and_exact()
    x = random_ids(40)
    with torch.no_grad():
        full, exact = model(x), exact_model(x)
        cache = make_cache(model)
        steps = prefill_then_decode(model, x, 17, cache)
    # Decode sums in another order than the full forward (and differently per CPU): bound it by
    # the full forward's own float32 error against float64, not a fixed atol.
    assert_float32_close(steps, full, exact)
    assert cache[0].offset == 40


def test_a_perturbed_cached_key_fails_the_cache_comparison():
    # The tolerance above must still catch a real cache bug: 1e-3 on one cached key position of
    # the last layer (keys are ~1.3 in size) moves logits ~9e-4, about 20x the tolerance.
    model, exact_model = float32_and_exact()
    x = random_ids(40)

    def nudge(cache):
        cache[-1].keys[:, :, 5] += 1e-3  # (B, kv_heads, positions, head_dim)

    with torch.no_grad():
        full, exact = model(x), exact_model(x)
        steps = prefill_then_decode(model, x, 17, perturb=nudge)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_float32_close(steps, full, exact)


def test_chunked_prefill_with_offset_uses_causal_mask():
    # A multi-token chunk after cached tokens must not see its own future.
    model, exact_model = float32_and_exact()
    x = random_ids(50, seed=1)
    with torch.no_grad():
        full, exact = model(x), exact_model(x)
        cache = make_cache(model)
        out = torch.cat([model(x[:, a:b], cache) for a, b in [(0, 10), (10, 33), (33, 50)]], dim=1)
    assert_float32_close(out, full, exact)


def test_logits_at_matches_those_positions():
    model, exact_model = float32_and_exact()
    x = random_ids(12)
    with torch.no_grad():
        full, exact = model(x), exact_model(x)
        # lm_head on fewer rows may use another kernel: float32 noise, not equality
        assert_float32_close(model(x, logits_at=-1), full[:, -1:], exact[:, -1:])
        at = torch.tensor([0, 5, 9])
        assert_float32_close(model(x, logits_at=at), full[:, at], exact[:, at])


def test_cache_trim_and_regrow():
    model, exact_model = float32_and_exact()
    x = random_ids(30, seed=2)
    with torch.no_grad():
        full, exact = model(x), exact_model(x)
        cache = make_cache(model)
        model(x[:, :20], cache)
        for c in cache:
            assert c.trim(5) == 5
        out = model(x[:, 15:30], cache)
    assert_float32_close(out, full[:, 15:30], exact[:, 15:30])


def test_kv_cache_grows_past_its_step():
    c = KVCache()
    c.step = 4
    k = torch.arange(2 * 3 * 10 * 2, dtype=torch.float32).view(2, 3, 10, 2)
    for t in range(10):
        kk, vv = c.update_and_fetch(k[:, :, t : t + 1], -k[:, :, t : t + 1])
    assert torch.equal(kk, k) and torch.equal(vv, -k)
    assert c.offset == 10 and c.keys.shape[2] >= 10


def test_batched_forward_matches_single_rows():
    model, exact_model = float32_and_exact()
    x = torch.cat([random_ids(16, seed=3), random_ids(16, seed=4)])
    with torch.no_grad():
        both = model(x)
        # A batch of two may block the matmuls differently from a batch of one.
        assert_float32_close(both[1:], model(x[1:]), exact_model(x[1:]))


def test_tied_embeddings_share_one_tensor():
    config = tiny_config(tie_word_embeddings=True)
    model = tiny_model(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bfloat16_runs_and_tracks_float32():
    config = tiny_config()
    m32, m16 = tiny_model(config), tiny_model(config, dtype=torch.bfloat16)
    x = random_ids(20)
    with torch.no_grad():
        a, b = m32(x), m16(x)
    assert b.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits (eps 2^-8 = 0.004); through two layers a few ulps of the largest
    # logit is expected, 0.05 (~13 ulps) still fails if a layer ran in the wrong dtype.
    assert (a - b.float()).abs().max() / a.abs().max() < 0.05


def test_missing_and_misshapen_tensors_are_reported():
    config = tiny_config()
    sd = random_state_dict(config)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"
    ):
        build_model(config, sd.items())
    sd = random_state_dict(config)
    sd["model.norm.weight"] = torch.ones(63)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape"):
        build_model(config, sd.items())


@pytest.mark.parametrize(
    "bad",
    [
        {"hidden_size": 0},
        {"num_attention_heads": 5},  # 64 not divisible by 5
        {"num_key_value_heads": 3},  # 4 heads not a multiple of 3
        {"rope_theta": float("nan")},
        {"vocab_size": 1 << 40},
        {"hidden_act": "gelu"},
    ],
)
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(CheckpointError):
        tiny_config(**bad)


def test_config_round_trips_through_hf_json():
    c = tiny_config(tie_word_embeddings=True)
    assert ModelConfig.from_hf(c.to_hf()) == c
    with pytest.raises(CheckpointError, match="unsupported model_type"):
        ModelConfig.from_hf({**c.to_hf(), "model_type": "llama"})


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_qwen2(tie):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Qwen2Config(
        **tiny_config(num_hidden_layers=3, tie_word_embeddings=tie).to_hf()
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    # Randomise the norms and biases too, which HF initialises to constants.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(
                    1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p)
                )
    config = ModelConfig.from_hf(hf_config.to_dict())
    assert config.tie_word_embeddings == tie
    ours = build_model(config, hf.state_dict().items())
    x = random_ids(64, seed=5)
    with torch.no_grad():
        expected = hf(x).logits
        # transformers in float64 is the exact answer; ours may be as far from it as
        # transformers' own float32 run is (times a small factor), see assert_float32_close.
        exact = float64_logits(hf, x)
        assert_float32_close(ours(x), expected, exact)
        # and through the cache, token by token
        assert_float32_close(prefill_then_decode(ours, x, 1), expected, exact)


def test_config_is_frozen():
    c = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 3  # type: ignore[misc]
    assert dataclasses.replace(c, num_hidden_layers=3).num_hidden_layers == 3
