"""Training data: records read and checked, rendered into token rows, packed and batched.

Formats:

- Qwen's fine-tuning JSON: a list of ``{"id", "conversations": [{"from": "system" | "user" |
  "assistant", "value"}]}``.
- OpenAI-style chat JSONL: one ``{"messages": [...], "tools": [...]}`` per line; assistant
  ``tool_calls`` and ``tool`` messages included.
- Preference pairs (DPO), JSON or JSONL: ``{"prompt": str}`` or ``{"messages": [...]}``, plus
  ``"chosen"`` and ``"rejected"`` (a string or assistant message(s)).
- Plain text for pretraining: ``.txt`` files, or JSONL records with a ``"text"`` field.

Every record is checked before anything trains; all problems come back together as a
``DataError`` naming file and line (JSONL) or index (JSON) and the reason. Strict JSON: NaN,
Infinity, duplicate keys, a byte-order mark and invalid UTF-8 are problems too, with file:line:col.
With ``max_rejected`` (a fraction) a few bad records are skipped instead, each with its reason,
as long as no more than that fraction is bad. Chat records are rendered with the model's own
chat template into token ids plus a loss mask that is True on the assistant's tokens only
(``ChatTemplate.render_for_training``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwenlm.chat.content import NonTextPart, join_text_parts
from qwenlm.chat.template import ChatTemplate
from qwenlm.errors import ChatTemplateError, QwenlmError, json_type
from qwenlm.strictjson import DuplicateKeyError, unique_keys
from qwenlm.tokenizer import Tokenizer

MAX_SHOWN = 50  # problems listed in a DataError message
MAX_TURN_CHARS = 1 << 20  # one message's text: far beyond any max_seq_len, short of a DoS


class DataError(QwenlmError):
    """Training data with problems; ``problems`` lists each as ``location: reason``."""

    def __init__(self, problems: Sequence[str], hint: str | None = None) -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_SHOWN]
        more = len(self.problems) - len(shown)
        lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        n = len(self.problems)
        super().__init__(
            f"{n} problem{'s' if n != 1 else ''} in the training data; nothing was trained:\n  "
            f"{lines}",
            hint=hint or "fix or remove these records and run again",
        )


class _NonFinite:
    """Stands in for NaN/Infinity while parsing, so the checks can say where it was."""

    def __init__(self, spelling: str) -> None:
        self.spelling = spelling


def _loads(text: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON; keep them visible instead.
    # It also keeps the last of two equal keys, so a record would train on half of itself.
    return json.loads(text, parse_constant=_NonFinite, object_pairs_hook=unique_keys)


def _duplicate_at(text: str) -> DuplicateKeyError:
    """Parse again, slowly, to find where the first object with a duplicate key starts."""
    decoder = json.JSONDecoder(parse_constant=_NonFinite, object_pairs_hook=unique_keys)

    def parse_object(s_and_end: tuple[str, int], *args: Any) -> Any:
        try:
            return json.decoder.JSONObject(s_and_end, *args)
        except DuplicateKeyError as e:
            if e.pos is None:
                e.pos = s_and_end[1] - 1
            raise

    decoder.parse_object = parse_object  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    try:
        decoder.decode(text)
    except DuplicateKeyError as e:
        return e
    raise AssertionError("the duplicate key went away")  # the fast parse found one


def _line_col(text: str | bytes, pos: int) -> str:
    nl = "\n" if isinstance(text, str) else b"\n"
    return f"{text.count(nl, 0, pos) + 1}:{pos - (text.rfind(nl, 0, pos) + 1) + 1}"


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """(value, None), or (None, "LINE:COL: reason") for bytes that are not strict JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{_line_col(raw, e.start)}: invalid UTF-8 (byte 0x{raw[e.start]:02x})"
    if text.startswith("\ufeff"):
        return None, "1:1: a UTF-8 byte-order mark; save the file without it"
    try:
        return _loads(text), None
    except DuplicateKeyError:
        dup = _duplicate_at(text)
        return None, f"{_line_col(text, dup.pos or 0)}: duplicate key {dup.key!r} in this object"
    except json.JSONDecodeError as e:
        return None, f"{e.lineno}:{e.colno}: bad JSON: {e.msg}"


@dataclass
class Record:
    where: str  # "file:LINE" or "file[INDEX]"
    value: Any


def read_records(
    path: str | Path, problems: list[str], rejected: list[str] | None = None
) -> list[Record]:
    """Records of a JSON (a list) or JSONL file; what cannot be read is added to ``problems``.

    A JSONL line that is not strict JSON goes to ``rejected`` instead when it is given (the
    other lines still count); a JSON file is one document, so any flaw in it is a problem.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{path}: no such file")
        return []
    except OSError as e:
        problems.append(f"{path}: cannot read: {e.strerror or e}")
        return []
    records = []
    if path.suffix == ".jsonl":
        bad_lines = problems if rejected is None else rejected
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            value, error = _parse(line)
            if error:
                _, col_reason = error.split(":", 1)  # parsed on its own: say the file's line
                bad_lines.append(f"{path}:{n}:{col_reason}")
            else:
                records.append(Record(f"{path}:{n}", value))
        return records
    data, error = _parse(raw)
    if error:
        problems.append(f"{path}:{error}")
        return []
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        problems.append(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return []
    return [Record(f"{path}[{i}]", value) for i, value in enumerate(data)]


def _non_finite(x: Any, path: str = "") -> str | None:
    """The field path of the first NaN/Infinity inside ``x``, or None."""
    if isinstance(x, _NonFinite):
        return path or "value"
    if isinstance(x, Mapping):
        for k, v in x.items():
            found = _non_finite(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    if isinstance(x, list):
        for i, v in enumerate(x):
            found = _non_finite(v, f"{path}[{i}]")
            if found:
                return found
    return None


# -- conversations ------------------------------------------------------------------------------
@dataclass
class Conversation:
    where: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class PreferencePair:
    where: str
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


def record_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        if "chosen" in value or "rejected" in value:
            return "preference"
        if "conversations" in value:
            return "qwen"
        if "messages" in value:
            return "openai"
        if "text" in value:
            return "text"
    return None


class _Invalid(Exception):
    pass


def _text(value: Any, what: str, *, allow_empty: bool = True) -> str:
    """The text of a message (content parts joined), checked for type, emptiness and size."""
    if isinstance(value, list):  # OpenAI content parts
        try:
            value = join_text_parts(value)
        except NonTextPart as e:
            part = f"{what}[{e.index}]"
            raise _Invalid(f"{part} must be a {{'type': 'text', 'text': ...}} part") from None
    if not isinstance(value, str):
        raise _Invalid(f"{what} must be a string, got {json_type(value)}")
    if len(value) > MAX_TURN_CHARS:
        raise _Invalid(f"{what} has {len(value):,} characters (at most {MAX_TURN_CHARS:,} a turn)")
    if not allow_empty and not value.strip():
        raise _Invalid(f"{what} is empty")
    return value


def _tool_calls(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"{what} must be a non-empty list")
    calls = []
    for i, call in enumerate(value):
        w = f"{what}[{i}]"
        if not isinstance(call, Mapping):
            raise _Invalid(f"{w} must be an object")
        fn = call.get("function", call)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Invalid(f"{w} needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            # OpenAI sends arguments as a JSON string; the template renders them as an object.
            try:
                args = _loads(args)
            except json.JSONDecodeError as e:
                raise _Invalid(f"{w}.function.arguments is not valid JSON: {e.msg}") from None
        if not isinstance(args, Mapping):
            raise _Invalid(f"{w}.function.arguments must be a JSON object")
        calls.append(
            {"type": "function", "function": {"name": fn["name"], "arguments": dict(args)}}
        )
    return calls


def _messages(raw: Any, *, qwen: bool) -> list[dict[str, Any]]:
    key, role_key, content_key = (
        ("conversations", "from", "value") if qwen else ("messages", "role", "content")
    )
    roles = ("system", "user", "assistant") if qwen else ("system", "user", "assistant", "tool")
    if not isinstance(raw, list) or not raw:
        raise _Invalid(f"{key} must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        w = f"{key}[{i}]"
        if not isinstance(m, Mapping):
            raise _Invalid(f"{w} must be an object")
        if role_key not in m:
            raise _Invalid(f"{w} has no {role_key!r} field")
        role = m[role_key]
        if role not in roles:
            raise _Invalid(f"{w} has unknown role {role!r} (use {', '.join(roles)})")
        if role == "system" and i != 0:
            raise _Invalid(f"{w}: a system message may only come first")
        msg: dict[str, Any] = {"role": role}
        calls = m.get("tool_calls") if not qwen else None
        if calls is not None:
            if role != "assistant":
                raise _Invalid(f"{w}: only assistant messages have tool_calls")
            msg["tool_calls"] = _tool_calls(calls, f"{w}.tool_calls")
        if content_key not in m and not (calls and role == "assistant"):
            raise _Invalid(f"{w} has no {content_key!r} field")
        content = m.get(content_key)
        if content is None and calls:
            content = ""
        msg["content"] = _text(content, f"{w}.{content_key}")
        if role == "assistant" and not msg["content"].strip() and not calls:
            raise _Invalid(f"{w}: empty assistant turn")
        if role == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if out:
            _check_order(out[-1], msg, f"{key}[{i - 1}]", w)
        out.append(msg)
    first = 1 if out[0]["role"] == "system" else 0
    if first >= len(out) or out[first]["role"] == "assistant":
        raise _Invalid(f"{key} must have a user turn before the first assistant turn")
    return out


def _check_order(prev: dict[str, Any], msg: dict[str, Any], w_prev: str, w: str) -> None:
    """Turns alternate; tool results follow the assistant call that asked for them."""
    role = msg["role"]
    if role == prev["role"] and role in ("user", "assistant"):
        raise _Invalid(f"{w_prev} and {w} are two {role} turns in a row")
    if role == "tool" and not (prev["role"] == "tool" or prev.get("tool_calls")):
        raise _Invalid(f"{w} is a tool result that no assistant tool call asked for")


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise _Invalid("tools must be a list of objects")
    return [dict(t) for t in value]


def parse_conversation(rec: Record, fmt: str) -> Conversation:
    value = rec.value
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected an object, got {json_type(value)}")
    kind = record_kind(value) if fmt == "auto" else fmt
    if kind not in ("qwen", "openai"):
        raise _Invalid(
            "expected a conversation ('conversations' in Qwen's format or 'messages')"
            + (f", got a {kind} record" if kind else "")
        )
    messages = _messages(
        value.get("conversations" if kind == "qwen" else "messages"), qwen=kind == "qwen"
    )
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid("the conversation has no assistant turn to learn from")
    return Conversation(rec.where, messages, _tools(value.get("tools")))


def _reply(value: Any, what: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid(f"{what} is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _Invalid(f"{what} must be a string or assistant message(s)")
    msgs = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or m.get("role", "assistant") != "assistant":
            raise _Invalid(f"{what}[{i}] must be an assistant message")
        calls = m.get("tool_calls")
        msg: dict[str, Any] = {"role": "assistant"}
        if calls is not None:
            msg["tool_calls"] = _tool_calls(calls, f"{what}[{i}].tool_calls")
        content = m.get("content")
        msg["content"] = _text("" if content is None and calls else content, f"{what}[{i}].content")
        if not msg["content"].strip() and not calls:
            raise _Invalid(f"{what}[{i}]: empty assistant turn")
        msgs.append(msg)
    return msgs


def parse_pair(rec: Record) -> PreferencePair:
    value = rec.value
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected an object, got {json_type(value)}")
    for key in ("chosen", "rejected"):
        if key not in value:
            raise _Invalid(f"a preference pair needs {key!r}")
    if "prompt" in value:
        prompt = [{"role": "user", "content": _text(value["prompt"], "prompt", allow_empty=False)}]
    elif "messages" in value:
        prompt = _messages(value["messages"], qwen=False)
        if prompt[-1]["role"] == "assistant":
            raise _Invalid("messages must end with the turn that chosen/rejected answer")
    else:
        raise _Invalid("a preference pair needs 'prompt' or 'messages'")
    chosen, rejected = _reply(value["chosen"], "chosen"), _reply(value["rejected"], "rejected")
    if chosen == rejected:
        raise _Invalid("chosen and rejected are the same")
    return PreferencePair(rec.where, prompt, chosen, rejected, _tools(value.get("tools")))


def load_records(
    paths: Sequence[str],
    kind: str,
    fmt: str = "auto",
    *,
    max_rejected: float = 0.0,
    rejected: list[str] | None = None,
) -> list[Any]:
    """Read and check every record: ``kind`` is ``chat`` or ``preference``.

    Raises one DataError listing every problem found in every file. With ``max_rejected`` > 0
    (a fraction of the records), bad records are skipped instead while there are no more than
    that; each skip (``location: reason``) is added to ``rejected`` for the run's manifest.
    Problems with a whole file (missing, not a list, broken JSON document) always stop.
    """
    problems: list[str] = []
    bad: list[str] = []
    out = []
    for path in paths:
        if Path(path).suffix == ".txt":
            problems.append(f"{path}: a .txt file is pretraining text, not {kind} records")
            continue
        for rec in read_records(path, problems, bad):
            nan = _non_finite(rec.value)
            if nan:
                bad.append(f"{rec.where}: {nan} is NaN or Infinity, which is not valid JSON")
                continue
            try:
                out.append(
                    parse_pair(rec) if kind == "preference" else parse_conversation(rec, fmt)
                )
            except _Invalid as e:
                bad.append(f"{rec.where}: {e}")
    total = len(out) + len(bad)
    if problems or len(bad) > max_rejected * total:
        raise DataError(
            problems + bad,
            hint=None
            if problems or not bad
            else f"{len(bad)} of {total} records are bad, more than data.max_rejected "
            f"({max_rejected:g}) allows; fix them, or raise data.max_rejected to skip them",
        )
    if rejected is not None:
        rejected += bad
    if not out:
        raise DataError([f"{', '.join(paths)}: no records"])
    return out


# -- token rows ---------------------------------------------------------------------------------
@dataclass
class Row:
    """Token ids of one training row; ``mask[j]`` is True when token j is a target.

    ``segments`` are the lengths of the examples packed into the row (attention stays within
    each, positions restart at each).
    """

    ids: np.ndarray
    mask: np.ndarray
    segments: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.segments:
            self.segments = (len(self.ids),)

    @property
    def n_targets(self) -> int:
        return int(self.mask[1:].sum())


@dataclass
class PairRow:
    chosen: Row
    rejected: Row

    @property
    def n_targets(self) -> int:
        return 1  # DPO averages over pairs


@dataclass
class RenderStats:
    examples: int = 0
    dropped: int = 0  # examples whose supervised tokens were all cut by truncation
    truncated: int = 0
    tokens: int = 0
    targets: int = 0


def _render(template: ChatTemplate, messages: list[dict[str, Any]], tools: Any) -> Row:
    ids, mask = template.render_for_training(messages, tools=tools)
    return Row(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))


def _truncate(row: Row, max_len: int) -> Row:
    return Row(row.ids[:max_len], row.mask[:max_len])


def render_conversations(
    convs: Sequence[Conversation], template: ChatTemplate, max_seq_len: int
) -> tuple[list[Row], RenderStats]:
    """Rows with the assistant-only loss mask; over-long rows are cut at ``max_seq_len`` and
    dropped (and counted) when no supervised token is left."""
    stats = RenderStats()
    rows, problems = [], []
    for c in convs:
        try:
            row = _render(template, c.messages, c.tools)
        except ChatTemplateError as e:
            problems.append(f"{c.where}: {e.message}")
            continue
        stats.examples += 1
        if len(row.ids) > max_seq_len:
            stats.truncated += 1
            row = _truncate(row, max_seq_len)
        if row.n_targets == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(row.ids)
        stats.targets += row.n_targets
        rows.append(row)
    if problems:
        raise DataError(problems)
    return rows, stats


def render_pairs(
    pairs: Sequence[PreferencePair], template: ChatTemplate, max_seq_len: int
) -> tuple[list[PairRow], RenderStats]:
    stats = RenderStats()
    rows, problems = [], []
    for p in pairs:
        try:
            chosen = _render(template, p.prompt + p.chosen, p.tools)
            rejected = _render(template, p.prompt + p.rejected, p.tools)
        except ChatTemplateError as e:
            problems.append(f"{p.where}: {e.message}")
            continue
        stats.examples += 1
        if max(len(chosen.ids), len(rejected.ids)) > max_seq_len:
            stats.truncated += 1
            chosen, rejected = _truncate(chosen, max_seq_len), _truncate(rejected, max_seq_len)
        if chosen.n_targets == 0 or rejected.n_targets == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(chosen.ids) + len(rejected.ids)
        stats.targets += chosen.n_targets + rejected.n_targets
        rows.append(PairRow(chosen, rejected))
    if problems:
        raise DataError(problems)
    return rows, stats


def pack(rows: Sequence[Row], max_seq_len: int) -> list[Row]:
    """Concatenate consecutive rows into rows of at most ``max_seq_len`` tokens (next-fit)."""
    packed: list[Row] = []
    group: list[Row] = []

    def flush() -> None:
        if group:
            packed.append(
                Row(
                    np.concatenate([r.ids for r in group]),
                    np.concatenate([r.mask for r in group]),
                    tuple(len(r.ids) for r in group),
                )
            )
            group.clear()

    used = 0
    for r in rows:
        if used + len(r.ids) > max_seq_len:
            flush()
            used = 0
        group.append(r)
        used += len(r.ids)
    flush()
    return packed


def split_eval(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random held-out split: (train, eval). At least one item stays in each."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return (
        [x for i, x in enumerate(items) if i not in held],
        [x for i, x in enumerate(items) if i in held],
    )


# -- batches ------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T); -100 where no loss
    positions: torch.Tensor  # (B, T)
    attn_mask: torch.Tensor | None  # (B, 1, T, T) boolean, None when plain causal suffices
    n_tokens: int  # real (non-pad) input tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.targets.to(device),
            self.positions.to(device),
            self.attn_mask.to(device) if self.attn_mask is not None else None,
            self.n_tokens,
        )


def collate(rows: Sequence[Row], pad_id: int) -> Batch:
    """Right-padded inputs (a row minus its last token) and targets (minus its first)."""
    T = max(len(r.ids) for r in rows) - 1
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segs = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    plain = True
    n_tokens = 0
    for b, r in enumerate(rows):
        n = len(r.ids) - 1
        ids = torch.from_numpy(np.asarray(r.ids, dtype=np.int64))
        input_ids[b, :n] = ids[:-1]
        targets[b, :n] = torch.where(torch.from_numpy(r.mask[1:]), ids[1:], -100)
        seg = torch.repeat_interleave(torch.arange(len(r.segments)), torch.tensor(r.segments))[:-1]
        starts = torch.tensor([0, *np.cumsum(r.segments)[:-1].tolist()])
        segs[b, :n] = seg
        positions[b, :n] = torch.arange(n) - starts[seg]
        plain = plain and n == T and len(r.segments) == 1
        n_tokens += n
    mask = None
    if not plain:
        # Attend causally within the same example; padding attends among padding (never to
        # nothing, which would make softmax NaN and poison the gradients).
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = ((segs[:, :, None] == segs[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    return Batch(input_ids, targets, positions, mask, n_tokens)


# -- plain-text corpora for pretraining -----------------------------------------------------------
def data_digest(paths: Sequence[str]) -> str:
    """sha256 over the bytes of data files, in order (what a resumed run must train on)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0" + str(len(p)).encode())  # file boundaries count
    return h.hexdigest()


def _tokenizer_fingerprint(tok: Tokenizer) -> str:
    h = hashlib.sha256()
    for i in range(tok.vocab_size):
        h.update(len(tok.id_to_bytes(i)).to_bytes(2, "little") + tok.id_to_bytes(i))
    h.update(str(tok.normalization).encode())
    return h.hexdigest()[:16]


def _read_texts(path: Path, problems: list[str]) -> list[str]:
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except FileNotFoundError:
            problems.append(f"{path}: no such file")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{path}: cannot read as UTF-8 text: {e}")
        return []
    texts = []
    for rec in read_records(path, problems):
        value = rec.value.get("text") if isinstance(rec.value, Mapping) else None
        if not isinstance(value, str):
            problems.append(f"{rec.where}: a text record needs a string 'text' field")
        elif value.strip():
            texts.append(value)
    return texts


def tokenize_corpus(
    paths: Sequence[str], tokenizer: Tokenizer, cache_dir: str | Path, *, log: Any = None
) -> np.ndarray:
    """All documents of ``paths`` as one token array, end-of-text between documents.

    Tokenized once: the result is cached under ``cache_dir`` by the content hash of the files
    and of the vocabulary, and memory-mapped (read-only) from there on.
    """
    eot = tokenizer.special_tokens.get("<|endoftext|>", tokenizer.eos_token_id)
    if eot is None:
        raise DataError(["the tokenizer has no <|endoftext|> token to separate documents"])
    h = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode())
    problems: list[str] = []
    for p in paths:
        try:
            h.update(Path(p).read_bytes())
        except OSError as e:
            problems.append(f"{p}: cannot read: {e.strerror}")
    if problems:
        raise DataError(problems)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    cache = Path(cache_dir) / f"{h.hexdigest()[:24]}.{np.dtype(dtype).name}"
    if not cache.is_file():
        docs = [text for p in paths for text in _read_texts(Path(p), problems)]
        if problems:
            raise DataError(problems)
        if log:
            log(
                f"tokenizing {len(docs)} document(s) from {len(paths)} file(s) (cached for later "
                f"runs)"
            )
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                for doc in docs:
                    f.write(np.asarray([*tokenizer.encode(doc), eot], dtype=dtype).tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, cache)
        finally:
            tmp.unlink(missing_ok=True)
    tokens = np.memmap(cache, dtype=dtype, mode="r")
    if len(tokens) < 2:
        raise DataError([f"{', '.join(paths)}: the corpus has fewer than 2 tokens"])
    return tokens


class TokenWindows:
    """Rows of ``length + 1`` consecutive corpus tokens (neighbours share one token)."""

    def __init__(self, tokens: np.ndarray, length: int, start: int = 0, count: int | None = None):
        self.tokens = tokens
        self.length = length
        total = (len(tokens) - 1) // length
        self.start = start
        self.count = total - start if count is None else count

    @staticmethod
    def total(tokens: np.ndarray, length: int) -> int:
        return (len(tokens) - 1) // length

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Row:
        if not 0 <= i < self.count:
            raise IndexError(i)
        a = (self.start + i) * self.length
        ids = np.asarray(self.tokens[a : a + self.length + 1], dtype=np.int64)
        return Row(ids, np.ones(len(ids), dtype=bool))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(n: int, step: int, size: int, seed: int) -> list[int]:
    """Row indices of optimizer step ``step`` (0-based): rows ``step*size ..`` of the endless
    sequence of epoch permutations. The data position is therefore the step number alone."""
    out = []
    first = step * size
    epoch, offset = divmod(first, n)
    order = epoch_order(n, seed, epoch)
    while len(out) < size:
        if offset == n:
            epoch, offset = epoch + 1, 0
            order = epoch_order(n, seed, epoch)
        take = min(size - len(out), n - offset)
        out += order[offset : offset + take]
        offset += take
    return out


def steps_for_epochs(n_rows: int, global_batch: int, epochs: float) -> int:
    return max(1, math.ceil(n_rows * epochs / global_batch))
