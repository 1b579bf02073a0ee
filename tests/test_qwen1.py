"""Qwen1: checkpoints in Qwen1 naming, its chat prompt, dynamic NTK and LogN attention."""

from __future__ import annotations

import base64
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    QWEN1,
    assert_float32_close,
    assert_within,
    float32_tolerance,
    float64_logits,
    qwen1_state_dict,
    tiny_ranks,
    write_qwen1_folder,
)

import qwenlm
from qwenlm.chat.qwen1 import Qwen1ChatTemplate
from qwenlm.errors import CheckpointError
from qwenlm.generation.cache import make_cache
from qwenlm.kernels import cpu_kernels
from qwenlm.models.rope import logn_scale, ntk_alpha, ntk_base
from qwenlm.tokenizer import Tokenizer
from qwenlm.weights import open_checkpoint
from qwenlm.weights.qwen1 import qwen1_config


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def qwen1_reference(
    sd: dict,
    cfg: dict,
    ids: list[int],
    prompt_len: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One forward pass written from Qwen1's modeling_qwen.py (no cache), in Qwen1's names.

    ``prompt_len``: the tokens after it were generated one at a time with the KV cache, so
    dynamic NTK's factor is the one Qwen1 computed at prefill, from the prompt's length.
    ``dtype=torch.float64`` gives the exact answer that float32 results are measured against.
    """
    sd = {k: v.to(dtype) for k, v in sd.items()}
    T, H, D, L = len(ids), cfg["num_attention_heads"], cfg["kv_channels"], cfg["seq_length"]
    alpha = 1.0
    if cfg["use_dynamic_ntk"]:  # QWenModel.get_ntk_alpha, kept in _ntk_alpha_cached_list
        n = prompt_len or T
        alpha = max(2 ** math.ceil(math.log(n / L, 2) + 1) - 1, 1)
    base = cfg["rotary_emb_base"] * alpha ** (D / (D - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=dtype) / D))
    freqs = torch.outer(torch.arange(T, dtype=dtype), inv_freq)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    logn = torch.tensor([math.log(i, L) if i > L else 1 for i in range(1, T + 1)], dtype=dtype)
    eps = cfg["layer_norm_epsilon"]
    x = sd["transformer.wte.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms(x, sd[p + "ln_1.weight"], eps)
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(T, H, D).transpose(0, 1) for t in qkv.split(H * D, -1))

        def rot(t: torch.Tensor) -> torch.Tensor:
            return t * cos + torch.cat((-t[..., D // 2 :], t[..., : D // 2]), -1) * sin

        q, k = rot(q), rot(k)
        if cfg["use_logn_attn"]:
            q = q * logn[None, :, None]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(T, H * D) @ sd[p + "attn.c_proj.weight"].T
        h = rms(x, sd[p + "ln_2.weight"], eps)
        a1, a2 = h @ sd[p + "mlp.w1.weight"].T, h @ sd[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ sd[p + "mlp.c_proj.weight"].T
    return rms(x, sd["transformer.ln_f.weight"], eps) @ sd["lm_head.weight"].T


def test_config_mapping():
    c = qwen1_config(QWEN1)
    assert (c.model_type, c.num_key_value_heads, c.head_dim) == ("qwen2", 4, 16)
    assert (c.intermediate_size, c.rope_theta, c.seq_length) == (96, 10000.0, 16)
    assert c.use_dynamic_ntk and c.use_logn_attn and not c.tie_word_embeddings
    with pytest.raises(CheckpointError, match=r"rotary_pct 0\.5 is not supported"):
        qwen1_config({**QWEN1, "rotary_pct": 0.5})
    with pytest.raises(CheckpointError, match="missing 'hidden_size'"):
        qwen1_config({k: v for k, v in QWEN1.items() if k != "hidden_size"})


@pytest.mark.parametrize("T", [12, 32, 64, 128])  # within, 2x, 4x and 8x seq_length (16)
def test_qwen1_folder_matches_qwen1_reference(tmp_path, T):
    sd = write_qwen1_folder(tmp_path)
    m = qwenlm.load(tmp_path, quant="none", device="cpu")
    x = torch.randint(0, 269, (T,), generator=torch.Generator().manual_seed(T)).tolist()
    want, exact = (
        qwen1_reference(sd, QWEN1, x, dtype=dtype) for dtype in (torch.float32, torch.float64)
    )
    assert_float32_close(m.logits(x), want, exact)


def test_qwen1_equals_qwen2_form_with_as_many_kv_heads_as_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = {**QWEN1, "use_dynamic_ntk": False, "use_logn_attn": False}
    sd = write_qwen1_folder(tmp_path, cfg)
    # The same weights written in Qwen2's form by hand, run by transformers' Qwen2.
    q2 = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(2):
        p, o = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = sd[p + f"attn.c_attn.{kind}"]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3), strict=True):
                q2[o + f"self_attn.{name}.{kind}"] = part
        q2 |= {
            o + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
            o + "input_layernorm.weight": sd[p + "ln_1.weight"],
            o + "post_attention_layernorm.weight": sd[p + "ln_2.weight"],
            o + "mlp.gate_proj.weight": sd[p + "mlp.w2.weight"],
            o + "mlp.up_proj.weight": sd[p + "mlp.w1.weight"],
            o + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"],
        }
    hf_cfg = transformers.Qwen2Config(
        vocab_size=480, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(q2, strict=True)
    m = qwenlm.load(tmp_path, quant="none", device="cpu")
    x = torch.randint(0, 269, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).logits[0]
    exact = float64_logits(hf, x)[0]
    assert_float32_close(m.logits(x[0]), expected, exact)
    assert_float32_close(m.logits(x[0]), qwen1_reference(sd, cfg, x[0].tolist()), exact)
    # full forward equals prefill plus cached decode
    cache = make_cache(m.model)
    with torch.no_grad():
        steps = [m.model(x[:, :10], cache)] + [
            m.model(x[:, t : t + 1], cache) for t in range(10, 40)
        ]
    assert_float32_close(torch.cat(steps, 1)[0], expected, exact)


def test_qwen1_loads_quantized_and_generates(tmp_path):
    write_qwen1_folder(tmp_path)
    ref = qwenlm.load(tmp_path, quant="none", device="cpu")
    m = qwenlm.load(tmp_path, quant="int8", device="cpu")
    x = list(range(5, 25))
    # int8 weights: close to the float model, not equal
    assert torch.nn.functional.cosine_similarity(m.logits(x), ref.logits(x)).min() > 0.99
    out = m.generate("hello", max_new_tokens=6, temperature=0, ignore_eos=True)
    assert isinstance(out, str)
    with open_checkpoint(tmp_path) as ck:
        gen = ck.generation_defaults
        assert gen["top_k"] == 0 and gen["repetition_penalty"] == 1.1
        tok = ck.tokenizer
        stops = {tok.special_tokens[t] for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")}
        assert set(gen["stop_token_ids"]) == stops


# -- chat format ------------------------------------------------------------------------------


@pytest.fixture(
    scope="module", params=["tiny", pytest.param("qwen.tiktoken", marks=pytest.mark.real_model)]
)
def qwen1_tokenizer(request, tmp_path_factory):
    """Qwen1's tokenizer over the tiny test vocabulary, and over the real qwen.tiktoken."""
    if request.param == "tiny":
        path = tmp_path_factory.mktemp("qwen1") / "qwen.tiktoken"
        path.write_text(
            "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in tiny_ranks().items())
        )
    else:
        path = request.getfixturevalue("qwen1_tiktoken_path")
    return Tokenizer.from_tiktoken_file(path)


def model_card_ids(tok: Tokenizer, query: str, history, system: str) -> list[int]:
    """The prompt ids of the Qwen1 model card's make_context, spelled out turn by turn."""
    S, E = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    nl = tok.encode("\n")
    ids = [S, *tok.encode("system"), *nl, *tok.encode(system), E]
    for q, r in history:
        ids += [*nl, S, *tok.encode("user"), *nl, *tok.encode(q), E]
        ids += [*nl, S, *tok.encode("assistant"), *nl, *tok.encode(r), E]
    ids += [*nl, S, *tok.encode("user"), *nl, *tok.encode(query), E]
    return [*ids, *nl, S, *tok.encode("assistant"), *nl]


def test_qwen1_chat_prompt_equals_model_card_format(qwen1_tokenizer):
    tok = qwen1_tokenizer
    t = Qwen1ChatTemplate(tok)
    history = [("你好", "你好！很高兴为你提供帮助。"), ("What is 1+1?", "2")]
    msgs = [{"role": "user", "content": "给我讲一个年轻人奋斗创业最终取得成功的故事。"}]
    ids = t.encode(msgs)
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "给我讲一个年轻人奋斗创业最终取得成功的故事。<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids == tok.encode_with_special(text)
    assert ids == model_card_ids(tok, msgs[0]["content"], [], "You are a helpful assistant.")
    assert tok.decode(ids) == text
    # with history and a system prompt, as model.chat(query, history=..., system=...) sends it
    pairs = [
        {"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))
    ]
    ids = t.encode([{"role": "system", "content": "Be brief."}, *pairs, msgs[0]])
    assert ids == model_card_ids(tok, msgs[0]["content"], history, "Be brief.")
    # Qwen1 tokenizes each piece on its own: a message that opens with newlines shows it
    odd = "\n\nleading newlines"
    ids = t.encode([{"role": "user", "content": odd}])
    assert ids == model_card_ids(tok, odd, [], "You are a helpful assistant.")
    if len(tok.encode("\n\n")) == 1:  # the real vocabulary merges newlines
        assert ids != tok.encode_with_special(tok.decode(ids))
    # user text never becomes control tokens: two <|im_end|> ids, the system's and the user's
    ids = t.encode([{"role": "user", "content": "<|im_end|>"}])
    assert ids.count(tok.special_tokens["<|im_end|>"]) == 2


def test_qwen1_max_window_size_drops_the_oldest_turns(qwen1_tokenizer):
    tok = qwen1_tokenizer
    system = "You are a helpful assistant."
    history = [(f"question number {i} " * 5, f"answer number {i} " * 5) for i in range(12)]
    full = Qwen1ChatTemplate(tok).make_context("last?", history)
    assert full == model_card_ids(tok, "last?", history, system)
    bare = len(model_card_ids(tok, "last?", [], system))

    def context(n: int) -> int:  # tokens of the newest n turns
        return len(model_card_ids(tok, "last?", history[len(history) - n :], system)) - bare

    # <|im_start|>system\n{system}<|im_end|>, each piece tokenized on its own
    system_turn = 2 + len(tok.encode("system")) + len(tok.encode("\n")) + len(tok.encode(system))
    window = system_turn + context(3) + context(1) // 2  # room for 3.5 turns
    ids = Qwen1ChatTemplate(tok, max_window_size=window).make_context("last?", history)
    # Qwen1's rule: keep the newest turns while system + kept turns stay below the window
    assert ids == model_card_ids(tok, "last?", history[-3:], system)
    assert system_turn + context(3) < window <= system_turn + context(4)


# -- dynamic NTK and LogN, by hand ------------------------------------------------------------


def test_dynamic_ntk_alpha_and_base_at_2x_4x_8x():
    L = 2048
    # context_value = log2(n / L) + 1; alpha = 2^ceil(context_value) - 1
    assert [ntk_alpha(n, L) for n in (1, L // 2, L)] == [1, 1, 1]
    assert [ntk_alpha(n, L) for n in (2 * L, 4 * L, 8 * L)] == [3, 7, 15]
    assert ntk_alpha(L + 1, L) == 3 and ntk_alpha(2 * L + 1, L) == 7
    # head_dim 128: base * alpha^(128/126)
    # 3^(1 + 1/63) = 3 * e^(ln 3 / 63) = 3.05277...; rel=1e-6: the constants have 7 digits
    assert ntk_base(10000.0, 3, 128) == pytest.approx(30527.74, rel=1e-6)
    assert ntk_base(10000.0, 7, 128) == pytest.approx(72195.87, rel=1e-6)
    assert ntk_base(10000.0, 15, 128) == pytest.approx(156588.4, rel=1e-6)


def test_logn_scale_by_hand():
    L = 2048
    pos = torch.tensor([0, L - 1, L, 2 * L - 1, 4 * L - 1, 8 * L - 1])
    # position p (0-based) gets log_L(p + 1) once p + 1 exceeds L: at 2x, 4x, 8x: 1 + log_L(k)
    want = [1.0, 1.0, math.log(L + 1) / math.log(L), 1 + 1 / 11, 1 + 2 / 11, 1 + 3 / 11]
    # float32 values near 1 (ulp 1.2e-7): 1e-6 allows a few ulps of the log ratio's rounding
    torch.testing.assert_close(logn_scale(pos, L), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_rotary_uses_the_ntk_base_for_the_call_length():
    from qwenlm.models.rope import ScaledRotaryEmbedding

    c = qwen1_config(QWEN1)  # head_dim 16, seq_length 16
    rope = ScaledRotaryEmbedding(c).eval()
    for n, alpha in ((16, 1), (32, 3), (64, 7), (128, 15)):
        cos, _ = rope(torch.arange(n)[None])
        base = 10000.0 * alpha ** (16 / 14)
        inv = 1.0 / (base ** (torch.arange(0, 16, 2).float() / 16))
        # the module evaluates this formula in float32 too: float32's default tolerance
        torch.testing.assert_close(cos[0, -1, :8], ((n - 1) * inv).cos())
    rope.train()  # Qwen1 trains without NTK
    cos, _ = rope(torch.arange(64)[None])
    torch.testing.assert_close(
        cos[0, -1, :8], (63 / (10000.0 ** (torch.arange(0, 16, 2) / 16))).cos()
    )


def test_qwen1_engine_and_chat_api(tmp_path):
    write_qwen1_folder(tmp_path)
    m = qwenlm.load(tmp_path, quant="none", device="cpu")
    assert isinstance(m.template, Qwen1ChatTemplate)
    assert m.generation_config().temperature == 1.0 and m.generation_config().top_k == 0
    # the batched engine applies the same NTK base and LogN factors as the plain forward
    x = list(range(3, 43))  # 2.5x seq_length
    got = m.engine.forward([(m.new_sequence(), x)], all_logits=True)[0]
    assert_float32_close(got, m.logits(x), float64_logits(m.model, torch.tensor([x]))[0])
    # chat() history pairs become Qwen1's make_context prompt
    prompt = m.encode_chat(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "world"},
        ]
    )
    assert prompt == m.template.make_context("world", [("hello", "hi")])
    response, history = m.chat("hello", history=[("a", "b")], max_new_tokens=4, temperature=0)
    assert history == [("a", "b"), ("hello", response)]


@pytest.mark.parametrize("prompt_len", [10, 40])
def test_dynamic_ntk_is_fixed_per_sequence_at_prefill(tmp_path, prompt_len):
    # Qwen1 computes the NTK factor from the prompt's length at prefill and keeps it while
    # decoding; a sequence's logits must not move with its batch-mates' lengths either.
    sd = write_qwen1_folder(tmp_path)
    m = qwenlm.load(tmp_path, quant="f32", device="cpu")  # row-exact kernels where present
    engine = m.engine
    x = list(range(3, 70))  # decoding runs past 4x seq_length
    want, exact = (
        qwen1_reference(sd, QWEN1, x, prompt_len=prompt_len, dtype=dt)
        for dt in (torch.float32, torch.float64)
    )
    alone, beside = engine.new_sequence(), engine.new_sequence()
    longer = engine.new_sequence()  # 130 tokens: NTK factor 15 where ours is 1 or 7
    first = engine.prefill(alone, x[:prompt_len])
    assert torch.equal(engine.prefill(beside, x[:prompt_len]), first)
    engine.prefill(longer, list(range(5, 135)))
    # Against the reference in float64: float32 rounding of differently ordered sums (the
    # reference's own float32 error sets the bound); the bug this guards against moved logits
    # by ~1.
    tol = float32_tolerance(want, exact)
    assert_within(first, exact[prompt_len - 1], tol)
    for i in range(prompt_len, len(x)):
        (a,) = engine.forward([(alone, [x[i]])])
        b, _ = engine.forward([(beside, [x[i]]), (longer, [7])])
        if cpu_kernels() is not None:
            assert torch.equal(a, b)  # row-exact path: the batch-mate changes no bit
        assert_within(a, exact[i], tol)
        assert_within(b, exact[i], tol)


def test_qwen1_trains_with_padding_masks(tmp_path):
    """LogN and dynamic NTK are inference-only in Qwen1, so training takes padded batches."""
    write_qwen1_folder(tmp_path)
    m = qwenlm.load(tmp_path, quant="none", device="cpu").model
    m.train()
    x = torch.randint(0, 269, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    h = m.model(x, None, torch.arange(40).expand(2, 40), mask)
    # training mode: plain RoPE (no NTK) and no LogN, even past seq_length
    sd, plain = qwen1_state_dict(QWEN1), {**QWEN1, "use_dynamic_ntk": False, "use_logn_attn": False}
    want, exact = (
        qwen1_reference(sd, plain, x[0].tolist(), dtype=dt) for dt in (torch.float32, torch.float64)
    )
    assert_float32_close(m.lm_head(h[0]), want, exact)


def test_rotary_ntk_on_device_equals_the_formula_at_every_length():
    from qwenlm.models.rope import ScaledRotaryEmbedding

    rope = ScaledRotaryEmbedding(qwen1_config(QWEN1)).eval()  # seq_length 16, head_dim 16
    for n in [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 129, 255, 256, 257, 1000]:
        base = ntk_base(10000.0, ntk_alpha(n, 16), 16)
        inv = 1.0 / (base ** (torch.arange(0, 16, 2).float() / 16))
        cos, _ = rope(torch.arange(n)[None])
        # The same float32 formula; a base one ulp off (computed on the device) moves the angle
        # at position 1000 by up to ~2e-6, so that is the most cos may differ.
        torch.testing.assert_close(cos[0, -1, :8], ((n - 1) * inv).cos(), rtol=0, atol=2e-6)


def test_cuda_graphs_only_for_configs_with_fixed_decode_steps():
    from qwenlm.models import cuda_graph_safe

    assert cuda_graph_safe(qwen1_config(QWEN1))  # NTK and LogN run on the device
    c = qwen1_config(QWEN1)
    assert not cuda_graph_safe(
        type(c).from_hf({**c.to_hf(), "dual_chunk_attention_config": {"chunk_size": 64}})
    )
    assert not cuda_graph_safe(
        type(c).from_hf({**c.to_hf(), "use_sliding_window": True, "sliding_window": 8,
                         "max_window_layers": 0})
    )  # fmt: skip
