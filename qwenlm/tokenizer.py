"""Qwen's byte-level BPE tokenizer on tiktoken, and a streaming UTF-8-safe decoder.

Ordinary tokens are byte strings ranked by id (Qwen's vocabulary is rank-ordered, which is
what lets tiktoken reproduce the reference BPE). Special tokens (``<|im_start|>``, ``<tool_call>``
...) are never produced from text by :meth:`Tokenizer.encode`: user text that contains their
spelling stays text, and control tokens enter a prompt only by id or through the chat template.
"""

from __future__ import annotations

import base64
import codecs
import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken

from qwenlm.errors import TokenizerError

# Qwen's pre-tokenizer (Qwen1 and Qwen2 alike): digits are split one by one (\p{N} alone).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen1's special tokens follow its 151,643 ordinary tokens.
QWEN1_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
)

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 3, 4, 5, 6


@cache
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map used in byte-level vocab files."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _unbytelevel(token: str) -> bytes:
    table = byte_decoder()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:
        raise TokenizerError(f"vocabulary entry {token!r} is not byte-level encoded") from None


class Tokenizer:
    """Byte-level BPE over a rank-ordered vocabulary plus special tokens.

    ``encode`` treats all text as text; ``encode_with_special`` also turns the spelling of
    special tokens into their ids and is for trusted text only (rendered chat templates).
    """

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int],
        *,
        pattern: str = QWEN_PATTERN,
        vocab_size: int | None = None,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
        normalization: str | None = None,
        name: str = "qwen",
    ) -> None:
        if len(ranks) < 256:
            raise TokenizerError(f"vocabulary has only {len(ranks)} byte tokens; expected >= 256")
        clash = set(ranks.values()) & set(special_tokens.values())
        if clash:
            raise TokenizerError(f"special token ids {sorted(clash)[:5]} also name ordinary tokens")
        try:
            self._enc = tiktoken.Encoding(
                name,
                pat_str=pattern,
                mergeable_ranks=dict(ranks),
                special_tokens=dict(special_tokens),
            )
        except Exception as e:  # tiktoken validates ranks and the pattern
            raise TokenizerError(f"cannot build tokenizer: {e}") from None
        self.special_tokens: dict[str, int] = dict(special_tokens)
        n = max([*ranks.values(), *special_tokens.values()]) + 1
        self.vocab_size = max(n, vocab_size or 0)
        table = [b""] * self.vocab_size  # ids without a token (padding rows) decode to nothing
        for token, i in ranks.items():
            table[i] = token
        for text, i in special_tokens.items():
            table[i] = text.encode("utf-8")
        self._bytes = table
        self._special_ids = frozenset(special_tokens.values())
        if normalization not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise TokenizerError(f"unknown Unicode normalization {normalization!r}")
        self.normalization = normalization
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, all of it as text: special-token spellings are not special."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        return self._enc.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Token ids of trusted ``text``, turning special-token spellings into their ids."""
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        return self._enc.encode(text, allowed_special="all")

    def token_to_id(self, token: str) -> int:
        """The id of a special token, or of a text that is exactly one ordinary token."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self.encode(token)
        if len(ids) != 1:
            raise TokenizerError(f"{token!r} is not a single token")
        return ids[0]

    # -- decoding -------------------------------------------------------------------------
    def id_to_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return self._bytes[token_id]

    def decode_bytes(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> bytes:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(self.id_to_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode(
            "utf-8", errors="replace"
        )

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: eos plus ChatML's end-of-turn and end-of-text when present."""
        ids = [self.eos_token_id] + [
            self.special_tokens.get(t) for t in ("<|im_end|>", "<|endoftext|>")
        ]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From ``tokenizer.ggml.*`` metadata of a GGUF file (model ``gpt2``, Qwen2 vocab)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model != "gpt2" or not isinstance(tokens, list):
            raise TokenizerError(
                f"GGUF tokenizer model {model!r} is not byte-level BPE ('gpt2')",
                hint="qwenlm reads Qwen vocabularies",
            )
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            types = [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError("GGUF token_type and tokens arrays differ in length")
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for i, (tok, ttype) in enumerate(zip(tokens, types, strict=True)):
            ttype = int(ttype)
            if ttype in (_CONTROL, _USER_DEFINED):
                specials[tok] = i
            elif ttype in (_NORMAL, _BYTE):
                b = _unbytelevel(tok)
                if b in ranks:
                    raise TokenizerError(f"GGUF vocabulary lists token {b!r} twice")
                ranks[b] = i

        def opt(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            return int(v) if v is not None else None

        return cls(
            ranks,
            specials,
            vocab_size=len(tokens),
            eos_token_id=opt("eos_token_id"),
            bos_token_id=opt("bos_token_id"),
            pad_token_id=opt("padding_token_id"),
        )

    @classmethod
    def from_hf_folder(cls, folder: str | Path, vocab_size: int | None = None) -> Tokenizer:
        """From a Hugging Face folder: tokenizer.json, or vocab.json + merges.txt."""
        folder = Path(folder)
        added: list[dict[str, Any]] = []
        # Qwen2's Hugging Face tokenizers normalize to NFC (the slow one always does); a GGUF
        # vocabulary carries no normalizer, and neither llama.cpp nor transformers applies one.
        normalization: str | None = "NFC"
        if (folder / "tokenizer.json").is_file():
            data = _read_json(folder / "tokenizer.json")
            model = data.get("model") or {}
            if model.get("type") not in (None, "BPE") or not isinstance(model.get("vocab"), dict):
                raise TokenizerError(
                    f"{folder / 'tokenizer.json'} is not a byte-level BPE tokenizer"
                )
            vocab = model["vocab"]
            added = data.get("added_tokens") or []
            normalization = _normalizer_form(data.get("normalizer"))
        elif (folder / "vocab.json").is_file():
            vocab = _read_json(folder / "vocab.json")
        else:
            raise TokenizerError(
                f"{folder} has no tokenizer.json or vocab.json",
                hint="copy the tokenizer files of the base model into the folder",
            )
        config = (
            _read_json(folder / "tokenizer_config.json")
            if (folder / "tokenizer_config.json").is_file()
            else {}
        )
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            added.append({"id": int(i), "content": entry.get("content")})
        specials = {a["content"]: int(a["id"]) for a in added if isinstance(a.get("content"), str)}
        ranks = {}
        for tok, i in vocab.items():
            if tok in specials:
                continue
            ranks[_unbytelevel(tok)] = int(i)

        def special_id(key: str) -> int | None:
            tok = config.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return specials.get(tok) if isinstance(tok, str) else None

        return cls(
            ranks,
            specials,
            vocab_size=vocab_size,
            eos_token_id=special_id("eos_token"),
            bos_token_id=special_id("bos_token"),
            pad_token_id=special_id("pad_token"),
            normalization=normalization,
        )

    @classmethod
    def from_tiktoken_file(cls, path: str | Path, vocab_size: int | None = None) -> Tokenizer:
        """Qwen1's ``qwen.tiktoken`` (``base64(token) rank`` per line) with Qwen1's specials."""
        ranks: dict[bytes, int] = {}
        try:
            lines = Path(path).read_bytes().splitlines()
        except OSError as e:
            raise TokenizerError(f"cannot read {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{n}: expected 'base64-token rank'") from None
        first = len(ranks)
        specials = {t: first + i for i, t in enumerate(QWEN1_SPECIALS)}
        return cls(
            ranks,
            specials,
            vocab_size=vocab_size,
            eos_token_id=specials["<|endoftext|>"],
            pad_token_id=specials["<|endoftext|>"],
            name="qwen1",
        )


class StreamDecoder:
    """Turns token ids into text as they arrive, never emitting half a UTF-8 character.

    Bytes of an unfinished character are held until the rest arrives; a sequence that can
    never become valid UTF-8 comes out as U+FFFD, as in :meth:`Tokenizer.decode`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: int | Sequence[int]) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        return self._dec.decode(self._tok.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is held back (as U+FFFD if it never completed a character)."""
        return self._dec.decode(b"", final=True)


def _normalizer_form(spec: Any) -> str | None:
    """The Unicode form of a tokenizer.json normalizer: None, NFC, ... (also inside a Sequence)."""
    if not isinstance(spec, Mapping):
        return None
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return kind
    if kind == "Sequence":
        forms = [f for f in map(_normalizer_form, spec.get("normalizers") or []) if f]
        if len(forms) > 1:
            raise TokenizerError(f"unsupported tokenizer normalizer sequence {forms}")
        if len(spec.get("normalizers") or []) != len(forms):
            raise TokenizerError("unsupported tokenizer.json normalizer (only Unicode forms are)")
        return forms[0] if forms else None
    raise TokenizerError(f"unsupported tokenizer.json normalizer {kind!r}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
