"""The engine: ragged batches, the native decode path, batched and speculative generation."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    float32_tolerance,
    float64_logits,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    write_tiny_gguf,
)

import qwenlm
from qwenlm.generation.engine import Engine
from qwenlm.generation.fastpath import KernelLayer, KernelStack, accelerate
from qwenlm.generation.generate import (
    GenerationConfig,
    batch_generate,
    generate,
    generate_step,
)
from qwenlm.generation.scheduler import Request, Scheduler
from qwenlm.generation.speculative import (
    PromptLookup,
    Speculation,
    SpeculationStats,
    lookup_draft,
)
from qwenlm.kernels import cpu_kernels
from qwenlm.quant import quantize

needs_kernels = pytest.mark.skipif(
    cpu_kernels() is None, reason="native kernels could not be built here"
)
CONFIG = dict(intermediate_size=128, num_hidden_layers=3)


def fast_model(mode="int8", seed=0, **overrides):
    model = quantize(tiny_model(tiny_config(**{**CONFIG, **overrides}), seed=seed, std=0.1), mode)
    model.fuse_projections()
    assert accelerate(model) == (cpu_kernels() is not None)
    return model


def twin_engines(mode="int8", kv_cache="float", **overrides):
    """Engines on the same model twice: the native layers, and the PyTorch layers they wrap."""
    fast, slow = fast_model(mode, **overrides), fast_model(mode, **overrides)
    slow.model.layers = torch.nn.ModuleList(kl.layer for kl in slow.model.layers)  # unwrap
    return Engine(fast, kv_cache=kv_cache), Engine(slow, kv_cache=kv_cache)


def decode_both(ef, es, p, tokens):
    """Prefill ``p`` on both engines, then step both through ``tokens``: (the two sequences,
    [(fast logits, slow logits) per step])."""
    sf, ss = ef.new_sequence(), es.new_sequence()
    ef.forward([(sf, p)])
    es.forward([(ss, p)])
    pairs = [(ef.forward([(sf, [t])])[0], es.forward([(ss, [t])])[0]) for t in tokens]
    return sf, ss, pairs


def prompt(n, seed=0):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def float32_bound(seed=0, **overrides) -> float:
    """Largest float32 rounding difference two paths of ``fast_model`` may show, measured.

    Each path may be float32_tolerance away from the exact (float64) logits, so two of them up
    to twice that; measured on the plain model over a 40-token prompt.
    """
    model = tiny_model(tiny_config(**{**CONFIG, **overrides}), seed=seed, std=0.1)
    x = torch.tensor([prompt(40)])
    with torch.no_grad():
        return 2 * float32_tolerance(model(x), float64_logits(model, x))


@needs_kernels
@pytest.mark.parametrize("mode, tol", [("f32", None), ("int8", 2e-2), ("int4", 1e-1)])
def test_native_decode_path_matches_the_pytorch_layers(mode, tol):
    # The fused native layer (one qlm_layer_forward call) against the same layer run as
    # PyTorch ops around the same projection modules. With float32 weights the two differ
    # only by rounding, which pins down the native norm, rotary, attention and SwiGLU. The
    # integer kernels quantize their inputs to int8, so a rounding-level difference upstream
    # can flip a code: 2e-2 of the largest logit is about the worst case of that activation
    # rounding in one layer (test_quant bounds it exactly per kernel call). This tiny
    # random int4 model amplifies one flipped code to ~3% by the logits (measured the same
    # before the layer was fused), hence its looser bound; a wrong kernel is off by O(1).
    f32 = float32_bound() if mode == "f32" else None

    def close(a, b):
        return (a - b).abs().max() <= (f32 if f32 is not None else tol * b.abs().max())

    ef, es = twin_engines(mode)
    p = prompt(40)
    sf, ss, pairs = decode_both(ef, es, p, prompt(12, seed=1))
    assert all(close(a, b) for a, b in pairs)
    # a ragged batch: a second sequence verifying 5 tokens next to a one-token step
    sf2, ss2 = ef.new_sequence(), es.new_sequence()
    ef.forward([(sf2, p[:17])])
    es.forward([(ss2, p[:17])])
    fa = ef.forward([(sf, [3]), (sf2, prompt(5, seed=2))], all_logits=True)
    fb = es.forward([(ss, [3]), (ss2, prompt(5, seed=2))], all_logits=True)
    for a, b in zip(fa, fb, strict=True):
        assert close(a, b)


@needs_kernels
@pytest.mark.parametrize("kv_cache", ["float", "f16", "int8"])
@pytest.mark.parametrize(
    "heads, kv_heads, hidden",
    [(14, 2, 224), (5, 1, 120), (6, 3, 48), (8, 1, 64)],  # head sizes 16, 24, 8, 8
)
def test_grouped_attention_matches_pytorch_for_head_layouts(heads, kv_heads, hidden, kv_cache):
    # The native attention takes a KV head's query heads together (up to 4 per pass over V,
    # 8 positions per block of scores, remainders of positions and of head sizes apart), and
    # splits them into tasks by rows and threads. Head counts around those sizes, 71 and more
    # positions (a remainder of 7), against the PyTorch layers; and a row's result does not
    # depend on the split: alone (its heads split across threads) or batched.
    shape = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=hidden)
    ef, es = twin_engines("f32", kv_cache, **shape)
    bound = float32_bound(**shape)
    p = prompt(71)
    sf, _, pairs = decode_both(ef, es, p, prompt(10, seed=5))
    if kv_cache == "f16":
        # The two paths' float32 keys and values differ in their last bits, so a few round to
        # neighbouring halves in the two caches: 3 keys and 1 value of layer 2 at the scalar
        # level for (14, 2, 224), one key at AVX-512 (the conversions themselves are exact,
        # tested apart). Each such flip moves the logits by a small part of float16's whole
        # effect (PyTorch's path with a float16 cache against a float one, 7.3e-3 there): a
        # twentieth of it is allowed on top of float32's rounding (4.6e-4 against the 2.0e-4
        # measured); a wrong conversion or layout is off by the whole effect or more. (The
        # int8 cache's rows, one scale each, measured 1.4e-5 apart: float32's bound holds.)
        _, plain = twin_engines("f32", "float", **shape)
        _, _, effect = decode_both(plain, es, p, prompt(10, seed=5))
        bound += max((a - b).abs().max() for a, b in effect) / 20
    assert all((a - b).abs().max() <= bound for a, b in pairs)
    other = ef.new_sequence()
    ef.forward([(other, p[:33])])
    (alone,) = ef.forward([(sf, [9])])
    sf.trim(1)
    batched = ef.forward([(other, [4]), (sf, [9])])[1]
    assert torch.equal(alone, batched)


@needs_kernels
def test_native_steps_of_models_of_several_sizes_in_one_thread():
    # A thread's residual-stream scratch serves models of any hidden size in any order; an
    # int8 model's embedding is read by its module into that scratch, by shape.
    shapes = [{}, dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128), {}]
    for shape in shapes:
        ef, es = twin_engines("int8", **shape)
        _, _, pairs = decode_both(ef, es, prompt(9), prompt(3, seed=2))
        for a, b in pairs:
            assert (a - b).abs().max() <= 2e-2 * b.abs().max()


@pytest.mark.parametrize("lengths", [(5, 23, 40), (5, 3, 7)])  # (positions 5, 3, 7: a span
def test_ragged_batch_rows_equal_separate_runs_exactly(lengths):  # as long as the batch)
    engine = Engine(fast_model())
    prompts = [prompt(n, seed=n) for n in lengths]
    seqs = [engine.new_sequence() for _ in prompts]
    for s, p in zip(seqs, prompts, strict=True):
        engine.forward([(s, p)])
    batched = engine.forward([(s, [7]) for s in seqs])
    for p, b in zip(prompts, batched, strict=True):
        fresh = engine.new_sequence()
        engine.forward([(fresh, p)])
        (alone,) = engine.forward([(fresh, [7])])
        assert torch.equal(alone, b)


@needs_kernels
def test_a_verified_segment_equals_token_by_token_steps_exactly():
    engine = Engine(fast_model())
    p, tail = prompt(30), prompt(9, seed=3)
    a, b = engine.new_sequence(), engine.new_sequence()
    engine.forward([(a, p)])
    engine.forward([(b, p)])
    together = engine.forward([(a, tail)], all_logits=True)[0]
    steps = torch.stack([engine.forward([(b, [t])])[0] for t in tail])
    assert torch.equal(together, steps)


def test_sequence_trim_and_reuse():
    engine = Engine(tiny_model())
    s = engine.new_sequence()
    engine.forward([(s, [1, 2, 3, 4, 5])])
    assert s.reuse([1, 2, 3, 9, 9]) == 3 and s.tokens == [1, 2, 3] and s.cache.length == 3
    assert s.reuse([1, 2, 3]) == 2  # always leaves a token to run
    s.reset()
    assert len(s) == 0


def test_exact_reuse_keeps_whole_prefill_pieces_only():
    engine = Engine(tiny_model(), prefill_chunk=32)
    s = engine.new_sequence()
    p = prompt(80)
    engine.prefill(s, p)
    assert s.exact == 64  # pieces [0, 32) and [32, 64) were whole; [64, 80) was not
    engine.forward([(s, [5])])  # decoded tokens are never exact
    assert s.exact == 64
    assert s.reuse([*p, 5, 6], exact=True, chunk=32) == 64
    assert engine.begin(s, p[:40], exact=True) == p[32:40]


def test_prefix_cache_hit_changes_no_number():
    # the same prompt continued, prefilled fresh and through a cached prefix: equal logits
    model = tiny_model()
    engine = Engine(model, prefill_chunk=32)
    p = prompt(70)
    first = engine.new_sequence()
    engine.prefill(first, p[:50])
    reused = engine.begin(first, p, exact=True)
    assert len(reused) == 70 - 32
    while reused:
        n, via_cache = engine.prefill_piece(first, reused)
        reused = reused[n:]
    fresh = engine.prefill(engine.new_sequence(), p)
    assert torch.equal(via_cache, fresh)


@needs_kernels
@pytest.mark.parametrize("mode", ["f32", "int8"])
def test_batch_generate_equals_one_by_one(mode):
    model = fast_model(mode)
    tok = tiny_tokenizer()
    prompts = [prompt(n, seed=n) for n in (3, 17, 30, 8)]
    configs = [
        GenerationConfig(temperature=0, max_new_tokens=12, ignore_eos=True),
        GenerationConfig(temperature=0, max_new_tokens=5, ignore_eos=True),
        GenerationConfig(
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10, ignore_eos=True, seed=4
        ),
        GenerationConfig(
            temperature=0.8, max_new_tokens=9, ignore_eos=True, seed=5, repetition_penalty=1.3
        ),
    ]
    together = batch_generate(model, tok, prompts, configs)
    for p, c, r in zip(prompts, configs, together, strict=True):
        alone = generate(model, tok, p, c)
        assert r.token_ids == alone.token_ids
        assert (r.text, r.finish_reason, r.completion_tokens) == (
            alone.text,
            alone.finish_reason,
            alone.completion_tokens,
        )


def test_lookup_draft():
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert lookup_draft(ctx, 3) == [4, 5, 9]  # the trigram 1 2 3 occurred before
    assert lookup_draft([5, 6, 7, 8], 3) == []
    assert lookup_draft([1, 2, 1, 2, 1, 2], 2) == [1, 2]  # most recent earlier match
    # a match of n tokens proposes at most 2 (n - 1); a lone repeated token proposes nothing
    long = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert lookup_draft(long, 8) == [5, 6, 7, 8, 9, 0]
    assert lookup_draft([7, 1, 2, 3, 4, 8, 1, 2], 8) == [3, 4]
    assert lookup_draft([5, 6, 7, 8, 6], 8) == []
    assert lookup_draft([5, 6, 7, 8, 6], 8, min_ngram=1) == [7]


def test_prompt_lookup_reads_on_through_a_copy_run():
    source = list(range(100, 140))
    ctx = [*source, 1, *source[:2]]  # the output starts copying the source
    look = PromptLookup()
    assert look.propose(ctx, 7) == source[2:4]  # a fresh 2-token match: 2 guesses
    # both accepted, and the model's own next token continued the copy: twice the guesses,
    # read on from the same place
    ctx += source[2:5]
    assert look.propose(ctx, 7) == source[5:9]
    ctx += source[5:10]
    assert look.propose(ctx, 7) == source[10:17]  # 8 wanted, capped at k
    # a rejected guess ends the run: a fresh match (here the last 4 tokens) and its 6 guesses
    ctx += [source[10], source[11], 7]
    assert look.propose(ctx, 7) == []  # "... 7" occurs nowhere before
    ctx += [*source[:4]]
    assert look.propose(ctx, 7) == source[4:10]
    # the same context, proposed again without anything emitted, is a fresh lookup
    assert PromptLookup().propose(ctx, 7) == look.propose(ctx, 7)
    # a longer run of copies ends where the context ends
    tail = [*source, *source[:36]]
    run = PromptLookup()
    assert run.propose(tail, 15) == source[36:40] + source[:2]
    tail += source[36:40] + source[:3]
    assert run.propose(tail, 15) == source[3:15]


def greedy(model, p, n):
    return generate(
        model,
        tiny_tokenizer(),
        p,
        GenerationConfig(temperature=0, max_new_tokens=n, ignore_eos=True, repetition_penalty=1.0),
    ).token_ids


def take(it, n):
    return [next(it) for _ in range(n)]


@needs_kernels
@pytest.mark.parametrize("mode", ["f32", "int8", "int4"])
def test_prompt_lookup_speculation_equals_greedy_decoding(mode):
    model = fast_model(mode)
    engine = Engine(model)
    # a repetitive prompt gives prompt lookup something to find
    p = prompt(12) * 3
    stats = SpeculationStats()
    spec = take(generate_step(engine, p, speculation=Speculation(num_draft=4, stats=stats)), 40)
    assert spec == greedy(model, p, 40)
    assert stats.target_passes < 40 and stats.accepted > 0  # it did accept guesses


@needs_kernels
def test_speculation_with_seeded_sampling_equals_sampling_without_it():
    # Each verified row is a decode step's numbers and the sampler draws once per emitted
    # token, so speculation changes nothing even when sampling.
    model = fast_model("int8")
    p = prompt(12) * 3
    config = GenerationConfig(
        temperature=0.7, top_k=5, top_p=0.9, seed=3, repetition_penalty=1.1, presence_penalty=0.5
    )
    stats = SpeculationStats()
    spec = take(generate_step(model, p, config, speculation=Speculation(stats=stats)), 40)
    assert spec == take(generate_step(model, p, config), 40)
    assert stats.proposed > 0


@needs_kernels
def test_draft_model_speculation_equals_greedy_decoding():
    target = fast_model("int8", seed=0)
    # a draft that agrees often: the same weights in int4; and one that rarely does
    for draft in (fast_model("int4", seed=0), fast_model("int8", seed=9)):
        p = prompt(20, seed=2)
        stats = SpeculationStats()
        spec = take(
            generate_step(
                target,
                p,
                speculation=Speculation(draft=Engine(draft), num_draft=5, stats=stats),
            ),
            30,
        )
        assert spec == greedy(target, p, 30)
        assert stats.proposed > 0


def test_speculation_argument_checks():
    from qwenlm.errors import GenerationError

    engine = Engine(tiny_model())
    with pytest.raises(GenerationError, match="num_draft"):
        Speculation(num_draft=16)
    assert Speculation().max_guesses == 7  # prompt lookup: one 8-row tile
    assert Speculation(draft=engine).max_guesses == 5
    assert Speculation(draft=engine, num_draft=3).max_guesses == 3
    other = Engine(tiny_model(tiny_config(vocab_size=400)))
    with pytest.raises(GenerationError, match="vocabulary"):
        next(generate_step(engine, [1, 2], speculation=Speculation(draft=other)))


def test_kernel_layer_is_only_used_with_kernel_projections():
    model = tiny_model()
    model.fuse_projections()
    assert not accelerate(model)  # plain nn.Linear layers: nothing to accelerate
    assert not any(isinstance(layer, KernelLayer) for layer in model.model.layers)


@needs_kernels
def test_f16_kv_cache_holds_the_float_cache_rounded_to_half():
    # The native step writes its keys and values as float16 (F16C's rounding, or the scalar
    # build's, at every level) as the PyTorch path's .half() does, and both read them back
    # into float32 attention: the halves agree but where a float32 rounding apart upstream
    # tips one to its neighbour, and the logits stay near the float32 cache's.
    from qwenlm.kernels import runnable_isas

    model = fast_model("f32")
    p = prompt(40)
    ef, eh = Engine(model), Engine(model, kv_cache="f16")
    slow = fast_model("f32")
    slow.model.layers = torch.nn.ModuleList(kl.layer for kl in slow.model.layers)
    es = Engine(slow, kv_cache="f16")
    sf, sh, ss = ef.new_sequence(), eh.new_sequence(), es.new_sequence()
    for e, s in ((ef, sf), (eh, sh), (es, ss)):
        e.forward([(s, p)])
    assert sh.cache.keys[0].dtype == torch.float16
    assert sh.cache.nbytes == sf.cache.nbytes // 2
    for t in prompt(6, seed=4):
        (a,) = ef.forward([(sf, [t])])
        (b,) = eh.forward([(sh, [t])])
        (c,) = es.forward([(ss, [t])])
        # a float32 rounding apart upstream can round a key or value to the neighbouring
        # half (2^-11 of it): far below what a wrong row or position would do
        assert (b - c).abs().max() <= 1e-3 * b.abs().max()
        # float16 keeps 11 significant bits: the logits move by a small fraction
        assert (a - b).abs().max() <= 0.01 * a.abs().max()
        n = len(sh)
        for layer in range(len(sh.cache.keys)):
            for a_, c_ in ((sh.cache.keys, ss.cache.keys), (sh.cache.values, ss.cache.values)):
                # inputs a float32 rounding apart (rotary, norms; deeper layers also the
                # halves tipped before them): mostly the same halves, the rest neighbours
                x, y = a_[layer][:, :n].float(), c_[layer][:, :n].float()
                assert ((x - y).abs() <= x.abs() * 1e-2 + 1e-4).all()
                assert (x == y).float().mean() > 0.98
    # At every level, the halves a native step writes are its float32 keys and values
    # rounded as torch's .half() rounds them (the first layer's, which the cache's format
    # cannot change), over a range from subnormal halves to overflow.
    import os

    big = fast_model("f32")
    with torch.no_grad():
        attn = big.model.layers[0].layer.self_attn
        v0 = (attn.n_heads + attn.n_kv_heads) * attn.head_dim  # the value rows: no rotary
        attn.qkv_proj.bias[v0:] = 0.0
        attn.qkv_proj.weight[v0:] *= torch.logspace(-9, 6, attn.qkv_proj.weight.shape[0] - v0)[
            :, None
        ]
    for level in runnable_isas():
        os.environ["QWENLM_ISA"] = level
        try:
            pair = []
            for fmt in ("float", "f16"):
                e = Engine(big, kv_cache=fmt)
                s = e.new_sequence()
                e.forward([(s, p[:3])])
                for t in p[3:9]:
                    e.forward([(s, [t])])
                pair.append(s.cache)
            fc, hc = pair
            for a, b in ((fc.keys[0], hc.keys[0]), (fc.values[0], hc.values[0])):
                assert torch.equal(a[:, :9].half(), b[:, :9]), level
            v = hc.values[0][:, :9].float()
            assert v.isinf().any() and ((v != 0) & (v.abs() < 6.1e-5)).any()
        finally:
            del os.environ["QWENLM_ISA"]


@needs_kernels
def test_int8_kv_cache_tracks_the_float_cache_and_keeps_exactness():
    model = fast_model("f32")
    ef, eq = Engine(model), Engine(model, kv_cache="int8")
    sf, sq = ef.new_sequence(), eq.new_sequence()
    p = prompt(40)
    ef.forward([(sf, p)])
    eq.forward([(sq, p)])
    assert sq.cache.keys[0].dtype == torch.int8
    assert sq.cache.nbytes < sf.cache.nbytes / 3
    for t in prompt(8, seed=4):
        (a,) = ef.forward([(sf, [t])])
        (b,) = eq.forward([(sq, [t])])
        # keys and values rounded to int8 (1/254 of a row's largest, at worst) through three
        # layers: a loose bound that still fails for a wrong scale or position (O(1) off)
        assert (a - b).abs().max() <= 0.05 * a.abs().max()
    # the native and PyTorch paths read the int8 cache alike
    slow = fast_model("f32")
    slow.model.layers = torch.nn.ModuleList(kl.layer for kl in slow.model.layers)
    es = Engine(slow, kv_cache="int8")
    ss = es.new_sequence()
    es.forward([(ss, p)])
    sq2 = eq.new_sequence()
    eq.forward([(sq2, p)])
    (a,) = eq.forward([(sq2, [5])])
    (b,) = es.forward([(ss, [5])])
    # the same int8 cache dequantized by two float32 paths: rounding only
    assert (a - b).abs().max() <= float32_bound()
    # speculation stays exact with a quantized cache
    spec = take(generate_step(eq, p * 2, speculation=Speculation(num_draft=4)), 20)
    ref = generate(
        eq,
        tiny_tokenizer(),
        p * 2,
        GenerationConfig(temperature=0, max_new_tokens=20, ignore_eos=True, repetition_penalty=1.0),
    ).token_ids
    assert spec == ref


def prompted_step(model):
    """An engine on ``model``, a sequence after a 20-token prompt, the prompt, and the logits
    of one more step (token 5)."""
    engine = Engine(model)
    p = prompt(20)
    seq = engine.new_sequence()
    engine.forward([(seq, p)])
    (logits,) = engine.forward([(seq, [5])])
    return engine, seq, p, logits


@needs_kernels
def test_native_layer_sees_a_replaced_weight():
    # The native layer caches its weights' C descriptor; a weight replaced after the first
    # step (a LoRA merge, a reload) must reach the next step, not the old pointers.
    model = fast_model("f32")
    engine, _, p, before = prompted_step(model)
    down = model.model.layers[0].layer.mlp.down_proj
    down.weight = torch.nn.Parameter(torch.zeros_like(down.weight), requires_grad=False)
    seq2 = engine.new_sequence()
    engine.forward([(seq2, p)])
    (after,) = engine.forward([(seq2, [5])])
    unwrapped = fast_model("f32")
    unwrapped.model.layers = torch.nn.ModuleList(kl.layer for kl in unwrapped.model.layers)
    unwrapped.model.layers[0].mlp.down_proj.weight = down.weight
    ref_engine = Engine(unwrapped)
    seq3 = ref_engine.new_sequence()
    ref_engine.forward([(seq3, p)])
    (ref,) = ref_engine.forward([(seq3, [5])])
    assert (after - before).abs().max() > 1e-3  # the change is visible at all
    assert (after - ref).abs().max() <= float32_bound()


@needs_kernels
def test_native_head_finds_the_greedy_token_as_numpy_does():
    # The output head folds each task's 32 logits into a running largest as it writes them
    # (threads take tasks in any order); its pick must be numpy's argmax: the first of equal
    # logits, a NaN before any number. Head rows are set to make ties and NaNs.
    import numpy as np

    from qwenlm.generation import sampling

    model = fast_model("f32", vocab_size=301)  # 9 tasks of 32 logits and one of 13
    engine = Engine(model)
    head = model.lm_head.weight
    seq = engine.new_sequence()
    engine.forward([(seq, prompt(12))])
    g = torch.Generator().manual_seed(3)
    v = torch.randn(head.shape[1], generator=g)
    cases = {
        "random": None,
        "all equal": lambda w: w.zero_(),
        "ties in two tasks": lambda w: (w.zero_(), w[[37, 9, 70]].copy_(v), w[[41, 100]].copy_(-v)),
        "ties in one task": lambda w: (w.zero_(), w[[35, 33]].copy_(v), w[[36, 34]].copy_(-v)),
        "a NaN": lambda w: w[250].fill_(float("nan")),
        "two NaNs": lambda w: (w[260].fill_(float("nan")), w[5].fill_(float("nan"))),
        "in the last, partial task": lambda w: (w.zero_(), w[-1].copy_(v), w[-2].copy_(-v)),
    }
    original = head.detach().clone()
    for name, edit in cases.items():
        with torch.no_grad():
            head.copy_(original)
            if edit is not None:
                edit(head)
        (logits,) = engine.forward([(seq, [7])])
        assert logits.shape == (head.shape[0],)
        ((noted, _, rows),) = sampling._KNOWN  # noted by the native step
        assert noted is logits and list(rows) == [logits.data_ptr()]
        assert rows[logits.data_ptr()] == int(np.argmax(logits.numpy())), name
        assert sampling.greedy_token(logits) == rows[logits.data_ptr()]
    # every row of a verification pass, sampled from views of it
    with torch.no_grad():
        head.copy_(original)
        head[[40, 44]] = 0.0  # (ties where these win)
    (block,) = engine.forward([(seq, [7, 8, 9, 10])], all_logits=True)
    ((noted, _, rows),) = sampling._KNOWN
    assert noted.data_ptr() == block.data_ptr() and len(rows) == 4
    for row in block:
        assert rows[row.data_ptr()] == int(np.argmax(row.numpy()))
        assert sampling.greedy_token(row) == rows[row.data_ptr()]
    assert sampling.greedy_token(block[0, :100]) == int(np.argmax(block[0, :100].numpy()))
    # changed in place after the step: the noted token is no longer used
    (logits,) = engine.forward([(seq, [8])])
    logits[3] = float(logits.max()) + 1.0
    assert sampling.greedy_token(logits) == 3


@needs_kernels
def test_native_step_sees_weights_moved_under_a_module():
    # A step's plan holds the weights' addresses; a weight whose storage changed without a
    # module registration (`.data` assignment) must reach the next step, as a replaced
    # module or tensor does (the registration hooks).
    model = fast_model("f32")
    engine, seq, p, before = prompted_step(model)
    norm = model.model.norm
    norm.weight.data = norm.weight.data * 2.0
    seq.trim(1)
    (after,) = engine.forward([(seq, [5])])
    ref = fast_model("f32")
    ref.model.norm.weight.data = ref.model.norm.weight.data * 2.0
    ref_engine = Engine(ref)
    seq2 = ref_engine.new_sequence()
    ref_engine.forward([(seq2, p)])
    (expected,) = ref_engine.forward([(seq2, [5])])
    assert (after - before).abs().max() > 1e-3
    assert torch.equal(after, expected)
    # a new output head module (registered): the next step reads it
    from qwenlm.quant.linear import DenseLinear

    model.lm_head = DenseLinear(torch.zeros_like(model.lm_head.weight), None)
    seq.trim(1)
    (zeros,) = engine.forward([(seq, [5])])
    assert torch.equal(zeros, torch.zeros_like(zeros))


def test_importing_qwenlm_makes_openmp_wait_passively_unless_told():
    # torch's spinning OpenMP workers took the cores the kernels' threads needed (see
    # qwenlm/__init__.py); a user's own setting wins.
    import os
    import subprocess
    import sys

    code = "import qwenlm, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"


@needs_kernels
def test_a_decode_step_runs_the_whole_model_in_one_native_call(monkeypatch):
    # The native forward (layers, final norm and output head in one call) must really carry
    # decode steps and verification batches (a silent fall back would pass every equality
    # test), and give what the stack call plus PyTorch's norm and head give: float32 weights,
    # so only rounding apart (the C norm sums in another order).
    model = fast_model("f32")
    engine = Engine(model)
    assert engine.native is not None
    seq, seq2 = engine.new_sequence(), engine.new_sequence()
    engine.forward([(seq, prompt(30))])
    engine.forward([(seq2, prompt(30))])
    monkeypatch.setattr(KernelLayer, "forward", lambda *a, **k: pytest.fail("per-layer call"))
    monkeypatch.setattr(KernelStack, "run_all", lambda *a, **k: pytest.fail("stack call"))
    native = [engine.forward([(seq, [7])])[0]]
    native += engine.forward([(seq, [3]), (seq2, prompt(4, seed=6))], all_logits=[False, True])
    monkeypatch.undo()
    seq.trim(2)
    seq2.trim(4)
    engine.native = None
    calls = []
    monkeypatch.setattr(KernelStack, "run_all", _counting(KernelStack.run_all, calls))
    generic = [engine.forward([(seq, [7])])[0]]
    generic += engine.forward([(seq, [3]), (seq2, prompt(4, seed=6))], all_logits=[False, True])
    assert len(calls) == 2 and all(r is not None for r in calls)
    assert [a.shape for a in native] == [b.shape for b in generic] == [(320,), (320,), (4, 320)]
    bound = float32_bound()
    assert all((a - b).abs().max() <= bound for a, b in zip(native, generic, strict=True))
    # and the stack call gives what the per-layer native path gives, exactly
    monkeypatch.setattr(KernelStack, "run_all", lambda *a, **k: None)
    seq2.trim(4)
    (per_layer,) = engine.forward([(seq2, [7])])
    seq2.trim(1)
    monkeypatch.undo()
    (stacked,) = engine.forward([(seq2, [7])])
    assert torch.equal(per_layer, stacked)


def _counting(fn, calls):
    def wrapper(*a, **k):
        calls.append(out := fn(*a, **k))
        return out

    return wrapper


def test_rotary_table_rows_equal_the_rotary_embedding_bit_for_bit():
    # The native forward reads cos/sin rows from a table computed once; each row must be
    # what the model computes for that position alone (plain and YaRN-scaled rotaries).
    from qwenlm.generation.fastpath import RopeRows
    from qwenlm.models.qwen2 import Qwen2ForCausalLM

    yarn = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    for overrides in ({}, yarn):
        rotary = Qwen2ForCausalLM(tiny_config(**CONFIG, **overrides)).model.rotary_emb
        table = RopeRows(rotary, rotary(torch.zeros(1, 1))[0].shape[-1])
        table.limit = 3000
        for ps in ([0], [1], [2047], [5, 6, 7, 1999], [2999], [3000], [4100, 17]):
            cos, sin = table.rows(ps)
            want_cos, want_sin = rotary(torch.tensor([ps]))
            assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])
            assert cos.is_contiguous() and sin.is_contiguous()


@needs_kernels
@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        dict(use_logn_attn=True, seq_length=32),
    ],
    ids=["window", "logn"],
)
def test_position_dependent_attention_keeps_the_generic_path(overrides):
    # Windows and LogN scaling change attention by position, which the native forward does
    # not compute: such a model gets none, and its engine still decodes what PyTorch does.
    ef, es = twin_engines("f32", **overrides)
    assert ef.model.native_forward is None and ef.native is None
    _, _, pairs = decode_both(ef, es, prompt(20), prompt(16, seed=4))
    assert all((a - b).abs().max() <= float32_bound(**overrides) for a, b in pairs)


@needs_kernels
def test_a_long_prompt_prefills_in_parts_between_decode_steps(tmp_path, monkeypatch):
    # On the row-exact prefill path (GGUF formats) the scheduler feeds a prompt at most
    # prefill_step tokens a step, riding in the running streams' decode pass, so a stream
    # already running keeps decoding while a long prompt arrives (and no pass of the prompt's
    # own reads the weights again); the prompt's reply is the same as with the prompt fed in
    # one piece alone.
    path = tmp_path / "tiny-q5.gguf"
    write_tiny_gguf(path, tiny_config(**CONFIG), qtype="Q5_0")
    engine = qwenlm.load(path, quant="gguf").engine
    assert engine.row_exact_prefill(engine.new_sequence())

    def greedy(n):
        return GenerationConfig(temperature=0, max_new_tokens=n, ignore_eos=True, stop_token_ids=())

    long_prompt = [(7 * i + 3) % 200 for i in range(150)]
    calls = []
    forward = engine.forward

    def logged(segments, **kw):
        calls.append([(s, len(t)) for s, t in segments])
        return forward(segments, **kw)

    monkeypatch.setattr(engine, "forward", logged)
    scheduler = Scheduler(engine, None, prefill_step=16)
    beside: list = []
    a = scheduler.submit(Request([5, 9, 11], greedy(40), beside.append))
    for _ in range(3):
        scheduler.step()
    parted: list = []
    b = scheduler.submit(Request(long_prompt, greedy(6), parted.append))
    while not scheduler.idle:
        scheduler.step()
    parts = [i for i, c in enumerate(calls) if any(s is b.seq and n > 1 for s, n in c)]
    assert [n for i in parts for s, n in calls[i] if s is b.seq] == [16] * 9 + [6]
    assert all(any(s is a.seq for s, _ in calls[i]) for i in parts)  # in a's decode passes
    monkeypatch.undo()
    whole: list = []
    Scheduler(engine, None, prefill_step=10_000).run(
        [Request(long_prompt, greedy(6), whole.append)]
    )
    alone: list = []
    Scheduler(engine, None).run([Request([5, 9, 11], greedy(40), alone.append)])
    tokens = [[t for o in out for t in o.token_ids] for out in (parted, whole, beside, alone)]
    assert len(tokens[0]) == 6 and tokens[0] == tokens[1]
    assert len(tokens[2]) == 40 and tokens[2] == tokens[3]
