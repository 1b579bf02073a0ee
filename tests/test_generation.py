"""Sampling, the token step, and the text stream (stop strings, finish reasons, UTF-8)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_VOCAB, tiny_config, tiny_model, tiny_specials, tiny_tokenizer
from torch import nn

from qwenlm.errors import GenerationError
from qwenlm.generation import sampling
from qwenlm.generation.engine import Engine
from qwenlm.generation.generate import GenerationConfig, generate, generate_step, stream_generate
from qwenlm.generation.sampling import (
    Sampler,
    apply_repetition_penalty,
    greedy_penalized,
    greedy_token,
    sample,
)

IM_END = tiny_specials()["<|im_end|>"]


class ScriptedModel(nn.Module):
    """Predicts a fixed continuation: the token after position p is script[p + 1 - prompt_len].

    Its "hidden state" is the position itself, which the head turns into the scripted token,
    so it runs through the real engine (sequences, positions, prefix reuse) without weights.
    """

    def __init__(self, script: list[int], prompt_len: int, context: int = 512) -> None:
        super().__init__()
        self.config = tiny_config(max_position_embeddings=context)
        self.script = script
        self.prompt_len = prompt_len
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.calls: list[int] = []
        self.model = SimpleNamespace(rotary_emb=SimpleNamespace(dynamic_ntk=False))

    def forward(self, input_ids, cache, *, positions, ntk_alpha=None, logits_at=None):
        self.calls.append(input_ids.shape[1])
        h = positions[..., None].float()  # (1, N, 1)
        return self.lm_head(h if logits_at is None else h[:, logits_at])

    def lm_head(self, h):
        logits = torch.full((*h.shape[:-1], TINY_VOCAB), -10.0)
        for idx, p in enumerate(h.reshape(-1).tolist()):
            i = int(p) + 1 - self.prompt_len
            logits.view(-1, TINY_VOCAB)[
                idx, self.script[i] if 0 <= i < len(self.script) else IM_END
            ] = 10.0
        return logits


def run(script, config=None, prompt=(1, 2, 3)):
    model = ScriptedModel(script, len(prompt))
    return list(
        stream_generate(
            model, tiny_tokenizer(), list(prompt), config or GenerationConfig(temperature=0)
        )
    )


def test_stops_at_stop_token_and_reports_stop():
    tok = tiny_tokenizer()
    chunks = run([*tok.encode("hello world"), IM_END, *tok.encode("never")])
    assert "".join(c.text for c in chunks) == "hello world"
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == 3  # two text tokens plus the stop token
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_length_finish_reason():
    tok = tiny_tokenizer()
    chunks = run(tok.encode("abcdefgh"), GenerationConfig(temperature=0, max_new_tokens=3))
    assert "".join(c.text for c in chunks) == "abc"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3


def test_ignore_eos_runs_to_the_limit():
    tok = tiny_tokenizer()
    chunks = run(
        [*tok.encode("ab"), IM_END, *tok.encode("cd")],
        GenerationConfig(temperature=0, max_new_tokens=5, ignore_eos=True),
    )
    assert chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == "ab<|im_end|>cd"


@pytest.mark.parametrize("stop", ["STOP", "OP", "hello world STOP"])
def test_stop_string_split_over_tokens_is_never_shown(stop):
    # One token per character: the stop string arrives spread over several tokens.
    text = "hello world STOP and more"
    script = [ord(c) for c in text]
    chunks = run(script, GenerationConfig(temperature=0, stop=(stop,)))
    shown = "".join(c.text for c in chunks)
    assert shown == text[: text.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    # No streamed prefix ever contained any part of the stop string beyond what is final.
    running = ""
    for c in chunks:
        running += c.text
        assert stop not in running


def test_partial_stop_string_is_released_when_it_does_not_complete():
    text = "abc ST ST STX done"
    chunks = run([ord(c) for c in text], GenerationConfig(temperature=0, stop=("STOP",)))
    assert "".join(c.text for c in chunks) == text
    assert chunks[-1].finish_reason == "stop"  # ended by the stop token after the script


def test_held_back_text_is_flushed_at_length_limit():
    chunks = run(
        [ord(c) for c in "xxST"], GenerationConfig(temperature=0, stop=("STOP",), max_new_tokens=4)
    )
    assert "".join(c.text for c in chunks) == "xxST"
    assert chunks[-1].finish_reason == "length"


def test_earliest_of_several_stop_strings_wins():
    text = "one two three"
    chunks = run([ord(c) for c in text], GenerationConfig(temperature=0, stop=("three", "two")))
    assert "".join(c.text for c in chunks) == "one "


def test_multibyte_characters_split_over_tokens_stream_whole():
    text = "你好👍🏽é"
    chunks = run(list(text.encode("utf-8")))
    for c in chunks:
        assert "\ufffd" not in c.text
    assert "".join(c.text for c in chunks) == text


def test_generate_collects_the_stream():
    tok = tiny_tokenizer()
    script = [*tok.encode("hello world"), IM_END]
    model = ScriptedModel(script, 3)
    res = generate(model, tok, [1, 2, 3], GenerationConfig(temperature=0))
    assert (res.text, res.finish_reason, res.prompt_tokens, res.completion_tokens) == (
        "hello world",
        "stop",
        3,
        3,
    )
    assert res.token_ids == script[:2]


def test_stopping_costs_no_extra_forward_pass():
    model = ScriptedModel([ord(c) for c in "abcdef"], 3)
    list(
        stream_generate(
            model, tiny_tokenizer(), [1, 2, 3], GenerationConfig(temperature=0, max_new_tokens=4)
        )
    )
    assert model.calls == [3, 1, 1, 1]  # prefill, then one step per further token


def test_sequence_cache_prefills_only_the_new_suffix():
    model = tiny_model()
    tok = tiny_tokenizer()
    cfg = GenerationConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompt = tok.encode("hello world, hello world")
    fresh = generate(model, tok, prompt, cfg).token_ids
    pc = Engine(model).new_sequence()
    assert generate(model, tok, prompt, cfg, sequence=pc).token_ids == fresh
    longer = prompt + fresh + tok.encode(" more text")
    fresh2 = generate(model, tok, longer, cfg).token_ids
    assert pc.reuse(longer) == len(prompt) + len(fresh) - 1  # all that was fed to the model
    assert generate(model, tok, longer, cfg, sequence=pc).token_ids == fresh2
    # a prompt that diverges early trims the cache back
    other = tok.encode("hello there")
    assert (
        generate(model, tok, other, cfg, sequence=pc).token_ids
        == generate(model, tok, other, cfg).token_ids
    )


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny_model()
    tok = tiny_tokenizer()
    prompt = tok.encode("hello")
    cfg = GenerationConfig(
        temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=20, ignore_eos=True, seed=7
    )
    a = generate(model, tok, prompt, cfg).token_ids
    b = generate(model, tok, prompt, cfg).token_ids
    c = generate(model, tok, prompt, GenerationConfig(**{**cfg.__dict__, "seed": 8})).token_ids
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_model()
    tok = tiny_tokenizer()
    prompt = tok.encode("hello")
    greedy = generate(
        model, tok, prompt, GenerationConfig(temperature=0, max_new_tokens=10, ignore_eos=True)
    ).token_ids
    for cfg in (
        GenerationConfig(
            temperature=2.0,
            top_k=1,
            top_p=1.0,
            repetition_penalty=1.0,
            max_new_tokens=10,
            ignore_eos=True,
            seed=1,
        ),
        GenerationConfig(
            temperature=2.0,
            top_k=0,
            top_p=1e-6,
            repetition_penalty=1.0,
            max_new_tokens=10,
            ignore_eos=True,
            seed=1,
        ),
    ):
        assert generate(model, tok, prompt, cfg).token_ids == greedy


def test_sample_filters():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0])
    assert sample(logits, temperature=0) == 3
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)}
    assert draws == {2, 3}
    # top_p: probabilities ~ [.03,.09,.24,.64,.01]; 0.8 keeps the two likeliest
    draws = {sample(logits, temperature=1.0, top_p=0.8, generator=g) for _ in range(200)}
    assert draws == {2, 3}


def test_greedy_token_is_torch_argmax():
    # the CPU path is numpy's argmax; it must pick what torch.argmax picks, ties and NaN too
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(151936, generator=g) for _ in range(3)]
    cases += [
        torch.tensor([1.0, 3.0, 3.0, 2.0]),
        torch.tensor([1.0, float("nan"), 3.0, float("nan")]),
        torch.full((5,), -float("inf")),
        torch.randn(64, generator=g).to(torch.bfloat16),
        torch.randn(2, 64, generator=g)[1],  # a non-contiguous view's row is still fine
        torch.randn(64, 2, generator=g)[:, 0],
    ]
    for x in cases:
        assert greedy_token(x) == int(torch.argmax(x))


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([2.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # the input is left as it was
    # one row may give the seen ids instead of a mask (what the sampler does)
    assert apply_repetition_penalty(logits, torch.tensor([1, 0]), 2.0).tolist() == out.tolist()
    rows = apply_repetition_penalty(torch.stack([logits, logits]), torch.stack([seen, ~seen]), 2.0)
    assert rows.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 0.5]]


def test_greedy_with_repetition_penalty_equals_argmax_of_the_penalized_copy():
    # greedy_penalized skips the copy: it trusts the head's noted token when that is unseen,
    # else penalizes in place and restores. Ties, NaN and penalties below 1 included.
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        vocab = int(torch.randint(2, 200, (1,), generator=g))
        x = torch.randn(vocab, generator=g) * 3
        if trial % 3 == 0:
            x = x.round()  # many equal logits
        if trial % 40 == 0:
            x[int(torch.randint(0, vocab, (1,), generator=g))] = float("nan")
        n = int(torch.randint(1, vocab, (1,), generator=g))
        ids = torch.randperm(vocab, generator=g)[:n]
        for penalty in (1.05, 1.5, 0.7, 1.0):
            want = greedy_token(apply_repetition_penalty(x, ids, penalty))
            before = x.clone()
            sampling.remember_greedy(x, [greedy_token(x)])  # as after a native step
            version = x._version
            seen = set(ids.tolist())
            assert greedy_penalized(x, ids, penalty, seen_set=seen) == want
            assert x._version == version  # other rows' noted tokens stay valid
            sampling._KNOWN.clear()
            assert greedy_penalized(x, ids, penalty) == want
            assert torch.equal(x.nan_to_num(9.5), before.nan_to_num(9.5))  # restored


def test_sampler_greedy_with_penalty_takes_the_tokens_of_the_plain_path():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 50, generator=g).round()
    cfg = GenerationConfig(temperature=0, repetition_penalty=1.3)
    fast = Sampler(cfg, [3, 4, 5], 50, torch.device("cpu"))
    tokens = []
    for row in rows:
        tokens.append(fast(row)[0])
    seen, want = [3, 4, 5], []
    for row in rows:
        ids = torch.tensor(list(dict.fromkeys(seen)))
        want.append(int(torch.argmax(apply_repetition_penalty(row, ids, 1.3))))
        seen.append(want[-1])
    assert tokens == want


def test_generate_step_rejects_empty_prompt():
    with pytest.raises(GenerationError, match="empty"):
        next(generate_step(tiny_model(), []))


def test_prompt_longer_than_context_is_an_error_not_truncation():
    model = ScriptedModel([1], 5, context=16)
    with pytest.raises(GenerationError, match="20 tokens, but the model's context is 16"):
        list(
            stream_generate(
                model, tiny_tokenizer(), list(range(20)), GenerationConfig(temperature=0)
            )
        )


def test_generation_stops_at_the_context_end_with_length():
    model = ScriptedModel([ord("a")] * 50, 10, context=16)
    chunks = list(
        stream_generate(model, tiny_tokenizer(), list(range(10)), GenerationConfig(temperature=0))
    )
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 6


def test_prompt_ids_outside_vocab_are_rejected():
    with pytest.raises(GenerationError, match="outside"):
        list(stream_generate(tiny_model(), tiny_tokenizer(), [1, TINY_VOCAB + 5]))


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"max_new_tokens": 0},
        {"stop": ("",)},
    ],
)
def test_generation_config_validation(bad):
    with pytest.raises(GenerationError):
        GenerationConfig(**bad)


def test_single_stop_string_is_accepted_as_str():
    assert GenerationConfig(stop="END").stop == ("END",)
