"""Chat prompts from the model's own Jinja template, tokenized so data never forges control tokens.

The template is rendered the way Hugging Face renders it (sandboxed Jinja, ``trim_blocks``,
``lstrip_blocks``, a ``tojson`` that keeps non-ASCII), so the text is the same. Before rendering,
every special-token spelling inside the conversation's strings (messages, tool definitions, tool
arguments) is swapped for a random per-render marker; after rendering, only the special-token
spellings that remain (the template's own) become control ids, and the markers turn back into
plain text. A user who types ``<|im_start|>`` gets those characters, not the token.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenlm.chat.content import NonTextPart, join_text_parts
from qwenlm.errors import ChatTemplateError
from qwenlm.tokenizer import Tokenizer

# ChatML, for checkpoints that carry no template of their own.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ROLES = ("system", "user", "assistant", "tool")
Message = Mapping[str, Any]


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Hugging Face's override of Jinja's tojson: no HTML escaping, non-ASCII kept.
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def normalize_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Validate a conversation and flatten OpenAI-style content parts into strings."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    if not messages:
        raise ChatTemplateError("messages is empty; a conversation needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] is a {type(m).__name__}, expected an object")
        role = m.get("role")
        if role not in ROLES:
            raise ChatTemplateError(
                f"messages[{i}] has unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}"
            )
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            try:
                content = join_text_parts(content)
            except NonTextPart:
                raise ChatTemplateError(
                    f"messages[{i}].content: only text parts are supported"
                ) from None
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ChatTemplateError(
                f"messages[{i}].content must be a string, got {type(content).__name__}"
            )
        m["content"] = content
        out.append(m)
    return out


class ChatTemplate:
    """A model's chat template bound to its tokenizer."""

    def __init__(self, source: str | None, tokenizer: Tokenizer) -> None:
        self.source = source or CHATML_TEMPLATE
        self.tokenizer = tokenizer
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._specials = specials
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def _render_marked(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        kwargs: dict[str, Any],
        nonce: str | None = None,
    ) -> tuple[str, re.Pattern[str]]:
        messages = normalize_messages(messages)
        # Callers that compare several renders of one conversation pass one nonce to all of them.
        nonce = nonce or secrets.token_hex(8)
        marker = "\U000f0000" + nonce + ":{}\U000f0001"

        def protect(x: Any) -> Any:
            if isinstance(x, str):
                if self._special_re is None:
                    return x
                return self._special_re.sub(
                    lambda m: marker.format(self._specials.index(m.group())), x
                )
            if isinstance(x, Mapping):
                return {protect(k): protect(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [protect(v) for v in x]
            return x

        context = {
            "messages": protect(messages),
            "tools": protect(list(tools)) if tools else None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": "",
            "eos_token": "",
            **protect(kwargs),
        }
        try:
            text = self._template.render(**context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None
        except Exception as e:  # a template can fail in many ways on odd input
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        marks = re.compile(re.escape("\U000f0000" + nonce + ":") + r"(\d+)\U000f0001")
        return text, marks

    def render(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt as text, exactly as the template renders it."""
        text, marks = self._render_marked(messages, tools, add_generation_prompt, kwargs)
        return marks.sub(lambda m: self._specials[int(m.group(1))], text)

    def encode(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """The prompt as token ids; only the template's own special tokens become control ids."""
        text, marks = self._render_marked(messages, tools, add_generation_prompt, kwargs)
        return self._encode_marked(text, marks)

    def _encode_marked(self, text: str, marks: re.Pattern[str]) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = []
        pos = 0
        pieces = list(self._special_re.finditer(text)) if self._special_re else []
        for m in [*pieces, None]:
            end = m.start() if m else len(text)
            # Text between control tokens, with the data's special spellings restored as text.
            segment = marks.sub(lambda mm: self._specials[int(mm.group(1))], text[pos:end])
            ids.extend(tok.encode(segment))
            if m:
                ids.append(tok.special_tokens[m.group()])
                pos = m.end()
        return ids

    def render_for_training(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        end_of_turn: str = "<|im_end|>",
        **kwargs: Any,
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and a loss mask, True on what the assistant writes.

        The supervised tokens of each assistant turn are those after the generation prompt
        (``<|im_start|>assistant\n``) up to and including the ``end_of_turn`` token that
        closes the turn, so a model learns to stop. Each turn is cut exactly where generation
        would start, so training sees the tokens the model will be asked to continue.
        Rendering and escaping are :meth:`encode`'s: data never becomes control tokens.
        """
        msgs = normalize_messages(messages)
        nonce = secrets.token_hex(8)
        full, marks = self._render_marked(msgs, tools, False, kwargs, nonce)
        spans: list[tuple[int, int]] = []  # supervised character ranges of the marked text
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise ChatTemplateError(
                    "messages[0] is an assistant turn; training needs a prompt before it"
                )
            before, _ = self._render_marked(msgs[:i], tools, True, kwargs, nonce)
            through, _ = self._render_marked(msgs[: i + 1], tools, False, kwargs, nonce)
            if not (through.startswith(before) and full.startswith(through)):
                raise ChatTemplateError(
                    "the chat template does not render conversations incrementally, so the "
                    f"assistant turn messages[{i}] cannot be located for the loss mask"
                )
            end = through.find(end_of_turn, len(before))
            spans.append((len(before), end + len(end_of_turn) if end >= 0 else len(through)))
        ids: list[int] = []
        mask: list[bool] = []
        pos = 0
        for start, end in [*spans, (len(full), len(full))]:
            for piece, supervised in ((full[pos:start], False), (full[start:end], True)):
                piece_ids = self._encode_marked(piece, marks) if piece else []
                ids += piece_ids
                mask += [supervised] * len(piece_ids)
            pos = end
        return ids, mask
