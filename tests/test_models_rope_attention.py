"""Long context: YaRN and linear RoPE scaling, sliding windows, chunked and dual chunk attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_VOCAB,
    assert_float32_close,
    assert_within,
    float32_tolerance,
    float64_logits,
    random_ids,
    random_state_dict,
    tiny_config,
    write_tiny_hf_folder,
)

import qwenlm
from qwenlm.config import ModelConfig
from qwenlm.errors import CheckpointError
from qwenlm.generation.cache import make_cache
from qwenlm.models import build_model
from qwenlm.models.attention import AttentionPlan, DualChunk, blockwise_attention
from qwenlm.models.rope import ScaledRotaryEmbedding, yarn_inv_freq

transformers = pytest.importorskip("transformers")


def hf_pair(config: ModelConfig, **hf_kwargs):
    """transformers' Qwen2 and ours with the same random weights."""
    hf = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**{**config.to_hf(), **hf_kwargs}, attn_implementation="eager")
    ).eval()
    sd = random_state_dict(config, seed=1, std=0.1)
    hf.load_state_dict(sd, strict=True)
    return hf, build_model(config, sd.items())


def cached(model, x: torch.Tensor, split: int) -> torch.Tensor:
    cache = make_cache(model)
    steps = [model(x[:, :split], cache)]
    steps += [model(x[:, t : t + 1], cache) for t in range(split, x.shape[1])]
    return torch.cat(steps, 1)


# -- YaRN ---------------------------------------------------------------------------------------

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def test_yarn_matches_transformers():
    config = tiny_config(rope_scaling=YARN, max_position_embeddings=256, num_hidden_layers=2)
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    hf, ours = hf_pair(config, rope_parameters={**params, "rope_theta": 10000.0})
    assert isinstance(ours.model.rotary_emb, ScaledRotaryEmbedding)
    x = random_ids(200, seed=2, vocab=TINY_VOCAB)
    with torch.no_grad():
        expected, exact = hf(x).logits, float64_logits(hf, x)
        assert_float32_close(ours(x), expected, exact)
        assert_float32_close(cached(ours, x, 150), expected, exact)
    # transformers 5 writes the block as rope_parameters: it reads back as the same scaling
    back = ModelConfig.from_hf(hf.config.to_dict())
    assert back.rope_scaling["rope_type"] == "yarn" and back.rope_scaling["factor"] == 4.0


def test_yarn_frequencies_match_transformers_for_qwen2_documented_block():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    block = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = transformers.Qwen2Config(
        hidden_size=896, num_attention_heads=14, max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 32768, "rope_theta": 1e6},
    )  # fmt: skip
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    got, factor = yarn_inv_freq(64, 1e6, block, 131072)
    # both evaluate the same float32 formula in a different order: a few ulps (1.2e-7 each)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # a Python float formula on both sides: approx's default 1e-6
    assert factor == pytest.approx(want_factor) == pytest.approx(0.1 * math.log(4) + 1)


def test_linear_scaling_matches_transformers():
    config = tiny_config(rope_scaling={"type": "linear", "factor": 2.0})
    hf, ours = hf_pair(
        config, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    )
    x = random_ids(80, vocab=TINY_VOCAB)
    with torch.no_grad():
        assert_float32_close(ours(x), hf(x).logits, float64_logits(hf, x))


def test_bad_rope_scaling_is_one_clear_error():
    with pytest.raises(CheckpointError, match="unsupported rope_scaling type 'su'"):
        build_model(tiny_config(rope_scaling={"type": "su"}), [])
    with pytest.raises(CheckpointError, match="needs a 'factor'"):
        build_model(tiny_config(rope_scaling={"type": "yarn"}), [])


# -- sliding window -----------------------------------------------------------------------------


def test_sliding_window_matches_transformers():
    config = tiny_config(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    assert [config.window_of_layer(i) for i in range(3)] == [None, 8, 8]
    hf, ours = hf_pair(config)
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    x = random_ids(40, seed=4, vocab=TINY_VOCAB)
    with torch.no_grad():
        expected, exact = hf(x).logits, float64_logits(hf, x)
        assert_float32_close(ours(x), expected, exact)
        assert_float32_close(cached(ours, x, 17), expected, exact)
        # the window matters: full attention gives other logits (1e-3 is ~100x float32 noise)
        full = build_model(tiny_config(num_hidden_layers=3), ours.state_dict().items())
        assert not torch.allclose(full(x), expected, atol=1e-3)
    assert ModelConfig.from_hf(hf.config.to_dict()).window_of_layer(1) == 8


def test_blockwise_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 100, 16, generator=g)
    k, v = torch.randn(2, 2, 130, 16, generator=g), torch.randn(2, 2, 130, 16, generator=g)
    pos = torch.arange(30, 130)  # 30 cached keys before the 100 queries
    mask = torch.arange(130)[None, :] <= pos[:, None]
    win = mask & (pos[:, None] - torch.arange(130)[None, :] < 20)
    for m, window in ((mask, None), (win, 20)):
        want, exact = (
            F.scaled_dot_product_attention(
                *(t.to(dt) for t in (q, k, v)), attn_mask=m, enable_gqa=True
            )
            for dt in (torch.float32, torch.float64)
        )
        # the online softmax sums in tiles: float32 noise of SDPA's own run against float64
        assert_float32_close(
            blockwise_attention(q, k, v, pos, window=window, block=16), want, exact
        )


# -- dual chunk attention -----------------------------------------------------------------------

DCA = {"chunk_size": 32, "local_size": 8}  # chunks of L = 24 positions


def test_dual_chunk_equals_ordinary_attention_within_one_chunk():
    plain = build_model(tiny_config(), random_state_dict(tiny_config(), seed=3).items())
    config = tiny_config(dual_chunk_attention_config=DCA)
    dca = build_model(config, random_state_dict(config, seed=3).items())
    x = random_ids(24, seed=5, vocab=TINY_VOCAB)  # exactly one chunk
    with torch.no_grad():
        assert torch.equal(dca(x), plain(x))
        assert torch.equal(cached(dca, x, 10), cached(plain, x, 10))
        # past one chunk the two differ (1e-3 is ~100x float32 noise)
        y = random_ids(60, seed=5, vocab=TINY_VOCAB)
        assert not torch.allclose(dca(y), plain(y), atol=1e-3)


def naive_dual_chunk(q, k, v, rotary, chunk_size: int, local_size: int) -> torch.Tensor:
    """DCA from its definition, one (query, key) pair at a time."""
    B, H, T, D = q.shape
    L = chunk_size - local_size

    def rot(x: torch.Tensor, p: int) -> torch.Tensor:
        cos, sin = rotary(torch.tensor([[p]]))
        x1, x2 = x.chunk(2, -1)
        return x * cos[0, 0] + torch.cat((-x2, x1), -1) * sin[0, 0]

    out = torch.zeros_like(q)
    for i in range(T):
        scores = torch.empty(B, H, i + 1, dtype=q.dtype)
        for j in range(i + 1):
            gap = i // L - j // L
            qp = (
                i % L
                if gap == 0
                else min(i % L + L, chunk_size)
                if gap == 1
                else min(2 * L - 1, chunk_size)
            )
            scores[..., j] = (rot(q[:, :, i], qp) * rot(k[:, :, j], j % L)).sum(-1) / math.sqrt(D)
        out[:, :, i] = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v[:, :, : i + 1])
    return out


def test_dual_chunk_attention_follows_its_definition_across_chunks():
    config = tiny_config(dual_chunk_attention_config=DCA)
    rotary = build_model(config, random_state_dict(config).items()).model.rotary_emb
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 80, 16, generator=g) for _ in range(3))
    pos = torch.arange(80)[None]
    cos, sin = rotary(pos)
    plan = AttentionPlan(pos, dual_chunk=DualChunk(32, 8), rotary=rotary, block=16)
    got = plan.attend(*plan.rotate(q, k, cos, sin), v)  # block 16: several tiles per chunk
    want = naive_dual_chunk(q, k, v, rotary, 32, 8)
    exact = naive_dual_chunk(q.double(), k.double(), v.double(), rotary, 32, 8)
    assert_float32_close(got, want, exact)


def test_dual_chunk_model_cache_and_engine(tmp_path):
    config = tiny_config(dual_chunk_attention_config=DCA, max_position_embeddings=256)
    model = build_model(config, random_state_dict(config).items())
    x = random_ids(90, seed=7, vocab=TINY_VOCAB)
    with torch.no_grad():
        assert_float32_close(cached(model, x, 50), model(x), float64_logits(model, x))
    # through qwenlm.load: the engine runs it inside one chunk and past it, prefill and decode
    write_tiny_hf_folder(tmp_path, config)
    m = qwenlm.load(tmp_path, quant="none", device="cpu")
    seq = m.new_sequence()
    short = x[0, :20].tolist()
    exact = float64_logits(m.model, torch.tensor([short]))[0]
    assert_float32_close(
        m.engine.forward([(seq, short)], all_logits=True)[0], m.logits(short), exact
    )
    engine_matches_full_forward(m, x[0].tolist(), split=70)


def engine_matches_full_forward(m, tokens: list[int], split: int) -> None:
    """Two sequences in one ragged batch: prefill, then decode token by token past ``split``."""
    full, exact = m.logits(tokens), float64_logits(m.model, torch.tensor([tokens]))[0]
    tol = float32_tolerance(full, exact)
    a, b = m.new_sequence(), m.new_sequence()
    m.engine.forward([(a, tokens[:split]), (b, tokens[: split - 9])])
    for i in range(split, len(tokens)):
        la, lb = m.engine.forward([(a, [tokens[i]]), (b, [tokens[i - 9]])])
        assert_within(la, exact[i], tol)
        assert_within(lb, exact[i - 9], tol)


def test_window_attention_in_the_engine(tmp_path):
    config = tiny_config(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    write_tiny_hf_folder(tmp_path, config)
    m = qwenlm.load(tmp_path, quant="none", device="cpu")
    engine_matches_full_forward(m, random_ids(40, seed=4, vocab=TINY_VOCAB)[0].tolist(), split=20)


def test_bad_dual_chunk_config_is_one_clear_error():
    with pytest.raises(CheckpointError, match="0 <= local_size < chunk_size"):
        tiny_config(dual_chunk_attention_config={"chunk_size": 8, "local_size": 8})
    with pytest.raises(CheckpointError, match="dual_chunk_attention_config"):
        ModelConfig.from_hf({**tiny_config().to_hf(), "dual_chunk_attention_config": {}})


def test_long_context_switches_when_loading(tmp_path):
    config = tiny_config()
    write_tiny_hf_folder(tmp_path, config)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    m = qwenlm.load(tmp_path, quant="none", config_overrides={"rope_scaling": yarn})
    assert m.config.rope_scaling == yarn
    assert isinstance(m.model.model.rotary_emb, ScaledRotaryEmbedding)
    # the native-kernel path (f32 weights) gets the same frequencies, also when decoding
    q = qwenlm.load(tmp_path, quant="f32", config_overrides={"rope_scaling": yarn})
    x = list(range(1, 150))
    want, exact = m.logits(x), float64_logits(m.model, torch.tensor([x]))[0]
    assert_float32_close(q.logits(x), want, exact)
    seq = q.new_sequence()
    q.engine.forward([(seq, x[:-1])])
    last = q.engine.forward([(seq, x[-1:])])[0]
    assert_within(last, exact[-1], float32_tolerance(want, exact))
    with pytest.raises(CheckpointError, match="unsupported rope_scaling"):
        qwenlm.load(tmp_path, quant="none", config_overrides={"rope_scaling": {"type": "x"}})
