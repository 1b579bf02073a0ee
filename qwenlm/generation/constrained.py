"""Constrained decoding: the sampler only sees tokens that a grammar allows next.

A :class:`Grammar` says what the output must be: JSON matching a JSON schema (or any JSON
object), text matching a regular expression, one of a few strings, or a Lark grammar.
:func:`processor` turns it into a :data:`~qwenlm.generation.config.LogitsProcessor` for
``GenerationConfig.logits_processors``: at each step it sets every token the grammar forbids to
-inf, and once the grammar is complete it allows only the end-of-turn tokens, so a constrained
reply ends where its grammar ends.

The matching is llguidance's (Microsoft's Rust library behind OpenAI's structured outputs, also
in vLLM and llama.cpp): a lazy lexer and an Earley parser over the token trie, ~20 us per token
on our 151,936-token vocabulary and ~1 ms to compile a schema (xgrammar, outlines-core: see
docs/serving.md for the comparison). It is an optional dependency (the ``serve`` extra); without
it, asking for a constraint is a clear error.

A processor must be a function of the ids it is given (speculative decoding calls it on draft
rows that may be rejected, and the ``n`` choices of a request share one config): it keeps a few
parser states ("lanes"), each with the ids it has consumed, and serves a call from the lane
whose ids are a prefix of the call's, rolling a lane back when ids diverge.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qwenlm.errors import GenerationError
from qwenlm.generation.config import LogitsProcessor
from qwenlm.tokenizer import Tokenizer

# JSON as Qwen writes it on one line (`{"a": 1, "b": [2, 3]}`): fixed separators and no free
# whitespace, so a small model cannot wander off into endless newlines inside an object.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept per tokenizer
LANES = 16  # parser states kept per processor (the most choices a request has)
_NEG_INF = torch.tensor(float("-inf"))


class ConstraintError(GenerationError):
    """A schema, regex or grammar that cannot be compiled, or output that left the grammar."""


@dataclass(frozen=True)
class Grammar:
    """What a constrained output must be. Build one with the class methods.

    ``kind`` is ``json`` (``source``: a JSON schema as text), ``regex``, ``choice`` (a JSON
    list of strings) or ``grammar`` (Lark in llguidance's dialect, which can embed JSON
    schemas as ``%json {...}`` and name special tokens as ``<[id]>``; or GBNF).
    """

    kind: str
    source: str

    @classmethod
    def json(cls, schema: Mapping[str, Any] | None = None, *, suffix: str = "") -> Grammar:
        """JSON valid under ``schema`` (None: any JSON object), then the literal ``suffix``."""
        schema = {"type": "object"} if schema is None else dict(schema)
        if not suffix:
            return cls("json", json.dumps(schema, ensure_ascii=False))
        styled = {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}
        body = json.dumps(styled, ensure_ascii=False)
        return cls("grammar", f"start: %json {body} {json.dumps(suffix, ensure_ascii=False)}")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text that matches ``pattern`` as a whole (Rust regex syntax)."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        """Exactly one of ``options``."""
        if not options or any(not isinstance(o, str) or not o for o in options):
            raise ConstraintError("a choice needs one or more non-empty strings")
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def grammar(cls, source: str) -> Grammar:
        """A context-free grammar: Lark in llguidance's dialect (the start rule is ``start``),
        or llama.cpp's GBNF (``root ::= ...``), which is converted to Lark."""
        return cls("grammar", source)

    def _llguidance(self, llg: Any) -> str:
        try:
            if self.kind == "json":
                return llg.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_STYLE)
            if self.kind in ("regex", "choice"):
                return llg.grammar_from(self.kind, self.source)
            if self.kind == "grammar":
                return llg.grammar_from("grammar", self.source)  # Lark, or GBNF converted
        except ValueError as e:
            raise ConstraintError(f"invalid {self.kind} constraint: {_one_line(str(e))}") from None
        raise ConstraintError(f"unknown grammar kind {self.kind!r}")


def _one_line(message: str) -> str:
    """llguidance's errors may quote the grammar over several lines; the first says it."""
    lines = message.strip().splitlines()
    return lines[0] if lines else "unknown error"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(
            "constrained decoding (response_format, guided or structured outputs, forced "
            "tool calls) needs the llguidance package",
            hint="pip install 'qwenlm[serve]' (or pip install llguidance)",
        ) from None
    return llguidance


class _Vocabulary:
    """Our vocabulary as ``llguidance.TokenizerWrapper`` reads it: token bytes and encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        n = tokenizer.vocab_size
        special = [tokenizer.is_special(i) for i in range(n)]
        # Special tokens get llguidance's 0xFF marker: never text, only named in a grammar.
        self.tokens = [
            b"\xff" + tokenizer.id_to_bytes(i) if special[i] else tokenizer.id_to_bytes(i)
            for i in range(n)
        ]
        self.special_token_ids = [i for i in range(n) if special[i]]
        self.eos_token_id = tokenizer.stop_token_ids[0]
        self.bos_token_id = None
        self.encode = tokenizer.encode

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.encode(text)


class _Compiler:
    """One tokenizer's llguidance vocabulary and its compiled grammars (LRU, thread-safe)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        llg = _llguidance()
        self.llg = llg
        n = tokenizer.vocab_size
        stops = list(tokenizer.stop_token_ids)
        self.vocab_size = n
        self.tokenizer = llg.LLTokenizer(
            llg.TokenizerWrapper(_Vocabulary(tokenizer)), n_vocab=n, eos_token=stops
        )
        self.cache: collections.OrderedDict[Grammar, Any] = collections.OrderedDict()
        self.lock = threading.Lock()

    def matcher(self, grammar: Grammar) -> Any:
        """A fresh matcher at the start of ``grammar`` (compiled once, then copied)."""
        with self.lock:
            template = self.cache.get(grammar)
            if template is not None:
                self.cache.move_to_end(grammar)
                return template.deep_copy()
        template = self.llg.LLMatcher(self.tokenizer, grammar._llguidance(self.llg), log_level=0)
        if template.is_error():
            raise ConstraintError(
                f"cannot compile the {grammar.kind} constraint: {_one_line(template.get_error())}"
            )
        with self.lock:
            self.cache[grammar] = template
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return template.deep_copy()


# Building a vocabulary takes seconds for Qwen's 151,936 tokens: one per tokenizer, the last few
# tokenizers kept (a process serves one model, or a handful in tests).
_compilers: collections.OrderedDict[int, tuple[Tokenizer, _Compiler]] = collections.OrderedDict()
_compilers_lock = threading.Lock()


def _compiler(tokenizer: Tokenizer) -> _Compiler:
    with _compilers_lock:
        hit = _compilers.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            _compilers.move_to_end(id(tokenizer))
            return hit[1]
        compiler = _Compiler(tokenizer)
        _compilers[id(tokenizer)] = (tokenizer, compiler)
        while len(_compilers) > 4:
            _compilers.popitem(last=False)
        return compiler


class GrammarProcessor:
    """The logits processor of one request: masks what ``grammar`` forbids after the ids."""

    def __init__(self, compiler: _Compiler, grammar: Grammar) -> None:
        self.compiler = compiler
        self.grammar = grammar
        self.start = compiler.matcher(grammar)
        self.lanes: list[tuple[list[int], Any]] = []  # (ids consumed, matcher), oldest first
        self.bitmask = torch.zeros((compiler.vocab_size + 31) // 32, dtype=torch.int32)

    def _lane(self, ids: Sequence[int]) -> Any:
        """A matcher that has consumed exactly ``ids``."""
        ids = list(ids)
        best, best_n = -1, -1
        for k, (seen, _) in enumerate(self.lanes):
            n = _common_prefix(seen, ids)
            if n > best_n:
                best, best_n = k, n
        if best < 0:
            seen, m = [], self.start.deep_copy()
        elif best_n < len(self.lanes[best][0]) and len(self.lanes) < LANES:
            # Diverging ids (another choice, a rejected draft): a lane of their own.
            seen, m = self.lanes[best]
            seen, m = self._rolled_back(list(seen), m.deep_copy(), best_n)
        else:
            seen, m = self._rolled_back(*self.lanes.pop(best), best_n)
        for t in ids[len(seen) :]:
            if m.is_stopped():
                raise ConstraintError("generation went on past the end of the constrained output")
            if not m.consume_token(t):
                raise ConstraintError(f"token {t} is not allowed here: {_one_line(m.get_error())}")
            seen.append(t)
        self.lanes.append((seen, m))
        if len(self.lanes) > LANES:
            self.lanes.pop(0)
        return m

    def _rolled_back(self, seen: list[int], m: Any, n: int) -> tuple[list[int], Any]:
        """``(seen[:n], m)`` with ``m`` rolled back to match (from the start if it cannot)."""
        if n == len(seen):
            return seen, m
        if m.rollback(len(seen) - n):
            return seen[:n], m
        return [], self.start.deep_copy()

    def allowed(self, ids: Sequence[int]) -> torch.Tensor:
        """Boolean mask (vocab,) of the tokens the grammar allows after ``ids``."""
        m = self._lane(ids)
        if m.is_error():
            raise ConstraintError(f"the constraint failed: {_one_line(m.get_error())}")
        m.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.compiler.vocab_size].view(np.bool_))

    def __call__(self, ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed(ids).to(logits.device)
        n = logits.shape[-1]
        if allowed.shape[0] != n:  # a model table wider than the vocabulary: padding stays out
            allowed = torch.cat([allowed, allowed.new_zeros(max(0, n - allowed.shape[0]))])[:n]
        return torch.where(allowed, logits, _NEG_INF.to(logits.device, logits.dtype))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) <= len(b) and list(b[: len(a)]) == list(a):
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def processor(tokenizer: Tokenizer, grammar: Grammar) -> LogitsProcessor:
    """A logits processor that keeps generation inside ``grammar`` and ends it there.

    Compiling is cached per tokenizer and grammar (LRU of ``CACHE_SIZE``); the first call for
    a tokenizer builds its vocabulary (2-6 s for Qwen's 151,936 tokens). Raises
    :class:`ConstraintError` for a grammar that does not compile or when llguidance is missing.
    """
    return GrammarProcessor(_compiler(tokenizer), grammar)


def json_processor(tokenizer: Tokenizer, schema: Mapping[str, Any] | None) -> LogitsProcessor:
    """A processor for JSON valid under ``schema``, or any JSON object when it is None
    (OpenAI's ``json_object``, Ollama's ``format: "json"``)."""
    return processor(tokenizer, Grammar.json(schema))
