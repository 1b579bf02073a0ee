"""Constrained decoding (qwenlm/generation/constrained.py) on a tiny random model.

A random model samples freely, so every output below is whatever the grammar let through: it
must parse and validate (JSON schemas checked with jsonschema), match the regex, be one of the
choices, and end with an end-of-turn token where the grammar ends. The processor is a function
of the ids it is given (several choices share it; speculative decoding feeds it draft rows),
checked against fresh processors and against decoding without speculation.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

pytest.importorskip("llguidance")
pytest.importorskip("jsonschema")

import jsonschema
import torch
from helpers import tiny_config, tiny_model, tiny_tokenizer

from qwenlm.generation import constrained
from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.constrained import ConstraintError, Grammar, json_processor, processor
from qwenlm.generation.engine import Engine
from qwenlm.generation.generate import batch_generate, generate
from qwenlm.generation.scheduler import Output, Request, Scheduler
from qwenlm.generation.speculative import Speculation, SpeculationStats

TOK = tiny_tokenizer()
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "hello"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 4}, "zip": {"type": "null"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(tiny_config(num_hidden_layers=2), std=0.1).eval())


def run(engine, grammar, seed=0, **options):
    options = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 400, **options}
    config = GenerationConfig(seed=seed, logits_processors=(processor(TOK, grammar),), **options)
    return generate(engine, TOK, TOK.encode("hello world"), config)


@pytest.mark.parametrize("seed", range(6))
def test_sampled_json_validates_against_a_nested_schema_and_ends(engine, seed):
    out = run(engine, Grammar.json(SCHEMA), seed=seed)
    assert out.finish_reason == "stop", out.text  # an end-of-turn token where the grammar ends
    jsonschema.validate(json.loads(out.text), SCHEMA)
    # one line, with Qwen's separators
    assert "\n" not in out.text and ('": ' in out.text)


def test_json_object_and_json_processor(engine):
    for seed in range(3):
        config = GenerationConfig(
            seed=seed,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=400,
            logits_processors=(json_processor(TOK, None),),
        )
        out = generate(engine, TOK, TOK.encode("hi"), config)
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:  # a random model may nest objects past the limit; what it wrote is still JSON-ish
            assert out.text.startswith("{")


def test_regex_choice_lark_and_gbnf(engine):
    for seed in range(4):
        out = run(engine, Grammar.regex(r"[0-9]{3}-(yes|no)"), seed=seed)
        assert re.fullmatch(r"[0-9]{3}-(yes|no)", out.text) and out.finish_reason == "stop"
        out = run(engine, Grammar.choice(["hello", "world", 'a "quoted" one']), seed=seed)
        assert out.text in ("hello", "world", 'a "quoted" one')
        out = run(engine, Grammar.grammar('start: "x" NUM "y"\nNUM: /[1-4]+/'), seed=seed)
        assert re.fullmatch(r"x[1-4]+y", out.text), out.text
        out = run(engine, Grammar.grammar('root ::= "a" [0-9] ("b" | "c")'), seed=seed)
        assert re.fullmatch(r"a[0-9][bc]", out.text), out.text


def test_json_with_a_suffix(engine):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = run(engine, Grammar.json(schema, suffix="}"))
    assert out.text.endswith("}}") and json.loads(out.text[:-1])["n"] is not None


def test_the_end_of_the_grammar_allows_only_end_of_turn_tokens():
    p = processor(TOK, Grammar.json(SCHEMA))
    doc = {"name": "ab", "age": 3, "tags": ["a"], "address": {"city": "x", "zip": None}, "ok": True}
    ids = TOK.encode(json.dumps(doc))
    for i, t in enumerate(ids):  # every token of a valid document is allowed in turn
        assert p.allowed(ids[:i])[t], (i, TOK.decode([t]))
    allowed = p.allowed(ids)
    assert set(torch.nonzero(allowed).flatten().tolist()) == set(TOK.stop_token_ids)
    assert not p.allowed([])[TOK.stop_token_ids[0]]  # and not before


def test_processor_is_a_function_of_its_ids():
    # Interleaved calls for diverging id lists (the n choices of a request, rejected drafts)
    # give the masks fresh processors give for the same ids.
    shared = processor(TOK, Grammar.json(SCHEMA))
    docs = [
        '{"name": "ab", "age": 12',
        '{"name": "hello", "age": 7, "tags": ["b"',
        '{"name": "',
        '{"name": "ab", "age": 1',
    ]
    rows = [TOK.encode(d) for d in docs]
    logits = torch.randn(TOK.vocab_size)
    for step in range(max(map(len, rows)) + 1):
        for ids in rows:
            prefix = ids[: min(step, len(ids))]
            want = processor(TOK, Grammar.json(SCHEMA))(prefix, logits)
            assert torch.equal(shared(prefix, logits), want)
    # going back to a shorter prefix (a rejected draft) works too
    assert torch.equal(
        shared(rows[0][:3], logits), processor(TOK, Grammar.json(SCHEMA))(rows[0][:3], logits)
    )


def test_n_choices_and_speculation_give_valid_and_equal_outputs(engine):
    grammar = Grammar.json(SCHEMA)
    base = dict(temperature=0.0, max_new_tokens=300)
    prompts = [TOK.encode("hello world hello world"), TOK.encode("in in in")]
    configs = [
        GenerationConfig(logits_processors=(processor(TOK, grammar),), **base) for _ in prompts
    ]
    plain = batch_generate(engine, TOK, prompts, configs)
    configs = [
        GenerationConfig(logits_processors=(processor(TOK, grammar),), **base) for _ in prompts
    ]
    stats = SpeculationStats()
    speculation = Speculation(num_draft=4, stats=stats)
    spec = batch_generate(engine, TOK, prompts, configs, speculation=speculation)
    assert stats.accepted > 0 and stats.accepted < stats.proposed  # drafts kept and rejected
    for a, b in zip(plain, spec, strict=True):
        assert a.token_ids == b.token_ids
        jsonschema.validate(json.loads(a.text), SCHEMA)


def test_compiled_once_and_cached():
    compiler = constrained._compiler(TOK)
    g = Grammar.json({"type": "object", "properties": {"zz": {"type": "integer"}}})
    processor(TOK, g)
    template = compiler.cache[g]
    processor(TOK, g)
    assert compiler.cache[g] is template
    # the key is the schema's JSON with its property order, which the output follows
    assert Grammar.json({"type": "object", "a": 2}) == Grammar.json({"type": "object", "a": 2})


@pytest.mark.parametrize(
    "grammar, why",
    [
        (Grammar.json({"type": "objec"}), "objec"),
        (Grammar.json({"type": "string", "format": "nonsense"}), "nonsense"),
        (Grammar.regex("(unclosed"), "regex"),
        (Grammar.grammar("start: undefined_rule"), "undefined_rule"),
    ],
)
def test_bad_grammars_are_clear_errors(grammar, why):
    with pytest.raises(ConstraintError) as e:
        processor(TOK, grammar)
    assert why in str(e.value)


def test_choice_needs_strings():
    with pytest.raises(ConstraintError):
        Grammar.choice([])


def test_missing_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    monkeypatch.setattr(constrained, "_compilers", type(constrained._compilers)())
    with pytest.raises(ConstraintError) as e:
        processor(TOK, Grammar.regex("a"))
    assert "llguidance" in str(e.value) and "qwenlm[serve]" in str(e.value)


def test_choices_of_one_request_share_the_processor(engine):
    # n=3 choices sample different tokens through one config (one processor): each validates.
    config = GenerationConfig(
        seed=1,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=400,
        logits_processors=(processor(TOK, Grammar.json(SCHEMA)),),
    )
    outs: list[Output] = []
    Scheduler(engine, TOK).run([Request(TOK.encode("hi"), config, outs.append, n=3)])
    texts = ["".join(o.text for o in outs if o.index == i) for i in range(3)]
    assert len(set(texts)) == 3
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
