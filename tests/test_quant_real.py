"""The fast engine on the real 0.5B model: quality of each weight format, exact speculation."""

from __future__ import annotations

import pytest
import torch

import qwenlm
from qwenlm.benchmark import perplexity
from qwenlm.generation.generate import GenerationConfig, batch_generate, generate, generate_step
from qwenlm.generation.speculative import Speculation, SpeculationStats
from qwenlm.kernels import cpu_kernels

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(cpu_kernels() is None, reason="no native kernels"),
]
GREEDY = GenerationConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def int8_model(real_model_path):
    return qwenlm.load(real_model_path, quant="int8")


def test_perplexity_of_each_format_stays_close_to_float32(real_model, int8_model, real_model_path):
    # 2048 tokens of the repo's text; the README's table uses 20k (benchmarks).
    base = perplexity(real_model, tokens=2048)
    int8 = perplexity(int8_model, tokens=2048)
    int4 = perplexity(qwenlm.load(real_model_path, quant="int4"), tokens=2048)
    assert abs(int8 / base - 1) < 0.01, (base, int8)
    assert abs(int4 / base - 1) < 0.10, (base, int4)


def test_prompt_lookup_speculation_is_exactly_greedy_on_real_weights(int8_model):
    code = (
        "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "Rewrite both functions above with type hints and docstrings."
    )
    ids = int8_model.encode_chat([{"role": "user", "content": code}])
    plain = generate(int8_model.engine, int8_model.tokenizer, ids, GREEDY).token_ids
    stats = SpeculationStats()
    steps = generate_step(int8_model.engine, ids, speculation=Speculation(num_draft=5, stats=stats))
    spec = [next(steps) for _ in range(len(plain))]
    assert spec == plain
    assert stats.accepted > 0


def test_batch_generation_equals_single_runs_on_real_weights(int8_model):
    prompts = [
        int8_model.encode_chat([{"role": "user", "content": q}])
        for q in (
            "Write a haiku about Python.",
            "What is 17 * 23?",
            "List three sorting algorithms.",
        )
    ]
    config = GenerationConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=24)
    together = batch_generate(int8_model.engine, int8_model.tokenizer, prompts, config)
    for p, r in zip(prompts, together, strict=True):
        assert r.token_ids == generate(int8_model.engine, int8_model.tokenizer, p, config).token_ids


def test_quantized_checkpoint_saves_and_reloads(tmp_path, int8_model, real_model_path):
    from qwenlm.cli.quantize import quantize_checkpoint

    out = quantize_checkpoint(str(real_model_path), out=tmp_path / "q8", mode="int8")
    again = qwenlm.load(out)
    assert again.weight_format == "int8"
    ids = int8_model.tokenizer.encode("def quicksort(arr):")
    # the same int8 codes and scales through the same kernels: bit for bit
    torch.testing.assert_close(again.logits(ids), int8_model.logits(ids), rtol=0, atol=0)
