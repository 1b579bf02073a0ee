"""Chat prompts from the model's own Jinja template, tokenized so data never forges control tokens.

The template is rendered the way Hugging Face renders it (sandboxed Jinja, ``trim_blocks``,
``lstrip_blocks``, a ``tojson`` that keeps non-ASCII), so the text is the same. Before rendering,
every special-token spelling inside the conversation's strings (messages, tool definitions, tool
arguments) is swapped for a random per-render marker; after rendering, only the special-token
spellings that remain (the template's own) become control ids, and the markers turn back into
plain text. A user who types ``<|im_start|>`` gets those characters, not the token.

A template comes inside the model file, so it is untrusted code: Jinja's sandbox keeps it away
from Python's internals, and :class:`BoundedEnvironment` bounds each render in time and size
(loops, calls and operators spend from a budget), so a template that loops for ever or asks for
10 GB fails with a :class:`ChatTemplateError` within :data:`RENDER_SECONDS`. A new
:class:`ChatTemplate` renders a representative conversation once, so such a template is refused
when the model loads rather than on the first request.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import threading
import time
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.visitor import NodeTransformer

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
    if isinstance(indent, int) and indent > 16:  # a wide indent on every line multiplies size
        raise TemplateLimitError(f"tojson indent {indent} is more than 16")
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Bounds on one render. A template may write MIN_OUTPUT_CHARS plus OUTPUT_PER_INPUT_CHAR per
# character of the conversation; no value it builds may be larger, and all it builds together
# (strings, list items, loop steps) may be WORK_PER_OUTPUT_CHAR times that.
RENDER_SECONDS = 2.0
MIN_OUTPUT_CHARS = 1 << 22
OUTPUT_PER_INPUT_CHAR = 8
WORK_PER_OUTPUT_CHAR = 16
INT_BITS = 4096  # integers a template computes (10 ** 1000 and 2 ** 4096 are far beyond need)
# str methods a template may call: none makes a string longer than its inputs, except those
# with a size check in BoundedEnvironment.call.
# fmt: off
_STR_METHODS = frozenset({
    "capitalize", "casefold", "count", "encode", "endswith", "find", "index", "isalnum",
    "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric",
    "isprintable", "isspace", "istitle", "isupper", "lower", "lstrip", "partition",
    "removeprefix", "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip",
    "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper",
    "center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join",
})
# fmt: on


class TemplateLimitError(SecurityError):
    """A render went past its time or size budget (see :class:`BoundedEnvironment`)."""


@dataclass
class _Budget:
    deadline: float
    size: int  # the largest value, and the whole output, in characters or items
    work: int  # characters and items still allowed to be built


def _weight(value: Any, limit: int) -> int:
    """Characters and items in ``value`` (about what printing it costs), counted to ``limit``.

    A list that holds one string n times weighs n times the string: printed, it is that long.
    """
    total, stack = 0, [value]
    while stack and total <= limit:
        x = stack.pop()
        if isinstance(x, (str, bytes, range)):
            total += len(x)
        elif isinstance(x, int):
            total += 1 + x.bit_length() // 3
        elif isinstance(x, (list, tuple)) and set(map(type, x)) == {str}:
            total += len(x) + sum(map(len, x))  # the common case, at C speed
        elif isinstance(x, (list, tuple, set, frozenset, dict)):
            total += len(x)
            stack.extend(x.items() if isinstance(x, dict) else x)
        else:
            total += 1
    return total


class _BoundedFormatter(SandboxedFormatter):
    # str.format in a template: each field is checked once its spec is resolved, and the
    # fields together must fit the budget.
    def __init__(self, env: BoundedEnvironment) -> None:
        super().__init__(env)
        self._bounded = env
        self._used = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        widths = re.findall(r"\d+", format_spec)
        if any(len(w) > 9 for w in widths):
            raise TemplateLimitError("a format width of more than nine digits")
        self._used += max([self._bounded.weight(value), *map(int, widths)])
        self._bounded.check_size(self._used)
        return super().format_field(value, format_spec)


class _BoundLoops(NodeTransformer):
    """Routes every loop, ``~`` concatenation and ``{{ }}`` through the environment's bounds."""

    @staticmethod
    def _call(name: str, *args: nodes.Expr) -> nodes.Call:
        return nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._call("bounded_iter", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        return self._call("bounded_concat", *self.generic_visit(node).nodes)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [
            n if isinstance(n, nodes.TemplateData) else self._call("bounded_value", n)
            for n in node.nodes
        ]
        return node


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Hugging Face's chat-template environment (an immutable Jinja sandbox, ``tojson``,
    ``raise_exception``, ``strftime_now``) with every render bounded in time and size.

    Loop steps, calls, filters and the ``+ * % **`` and ``~`` operators each check the render's
    deadline and spend from its budget; sizes that would explode (``'a' * 10**10``, a
    ``center`` or ``replace`` that multiplies) are refused before anything is built. Render
    only inside :meth:`budget`; code that runs outside one (Jinja folding constants at compile
    time) is refused and so deferred to the render.
    """

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        self._local = threading.local()
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.pop("lipsum", None)  # a text generator no chat template needs
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def compile_template(self, source: str) -> jinja2.Template:
        """Parse ``source`` and compile it with every loop and output bounded."""
        return self.from_string(_BoundLoops().visit(self.parse(source)))

    def render_bounded(
        self, template: jinja2.Template, context: Mapping[str, Any], input_chars: int
    ) -> str:
        """Render under a fresh budget sized for a conversation of ``input_chars``."""
        size = MIN_OUTPUT_CHARS + OUTPUT_PER_INPUT_CHAR * input_chars
        self._local.budget = _Budget(
            time.monotonic() + RENDER_SECONDS, size, WORK_PER_OUTPUT_CHAR * size
        )
        try:
            out, n = [], 0
            for chunk in template.generate(**context):
                n += len(chunk)
                if n > size:
                    raise TemplateLimitError(f"the output passed {size:,} characters")
                out.append(chunk)
            return "".join(out)
        finally:
            self._local.budget = None

    def _tick(self) -> _Budget:
        b = getattr(self._local, "budget", None)
        if b is None:
            raise TemplateLimitError("template code ran outside a bounded render")
        if time.monotonic() > b.deadline:
            raise TemplateLimitError(f"the render ran past {RENDER_SECONDS:g} s")
        return b

    def weight(self, value: Any) -> int:
        """:func:`_weight` of ``value``, counted no further than this render's size limit."""
        return _weight(value, self._tick().size)

    def check_size(self, size: int) -> None:
        """Refuse to build a value of ``size`` characters or items beyond the budget."""
        b = self._tick()
        if size > b.size:
            raise TemplateLimitError(
                f"the template would build a value of {size:,} characters or items "
                f"(at most {b.size:,})"
            )

    def _spend(self, value: Any) -> Any:
        b = self._tick()
        weight = _weight(value, b.size)
        self.check_size(weight)
        b.work -= weight
        if b.work < 0:
            raise TemplateLimitError("the template built too much in one render")
        return value

    def check_format(self, fmt: Any, args: Any) -> None:
        """Refuse a %- or {}-format whose widths, with its arguments, exceed the budget."""
        if not isinstance(fmt, str):
            return
        args = args if isinstance(args, (tuple, list)) else (args,)
        widths = re.findall(r"\d+", fmt)
        if any(len(w) > 9 for w in widths):
            raise TemplateLimitError("a format width of more than nine digits")
        ints = [abs(a) for a in args if isinstance(a, int) and not isinstance(a, bool)]
        self.check_size(len(fmt) + sum(map(int, widths)) + sum(ints) + self.weight(list(args)))

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """A loop's items, one budget step each."""
        b = self._tick()
        for item in iterable:
            if b.work <= 0 or time.monotonic() > b.deadline:
                self._tick()
                raise TemplateLimitError("the template's loops ran too long")
            b.work -= 1
            yield item

    def bounded_concat(self, *parts: Any) -> str:
        """The ``~`` operator, refused before it builds a string that is too long."""
        self.check_size(self.weight(list(parts)))
        strings = [str(p) for p in parts]
        return self._spend("".join(strings))

    def bounded_value(self, value: Any) -> Any:
        """What a ``{{ }}`` writes: each value is counted, so doubling a block set stops."""
        return self._spend(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*" and ints:
            if left.bit_length() + right.bit_length() > INT_BITS:
                raise TemplateLimitError("an integer product too large for a template")
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int):
                self.check_size(self.weight(seq) * max(n, 0))
        elif operator == "**" and ints:
            if right > 0 and right * max(abs(left).bit_length() - 1, 0) > INT_BITS:
                raise TemplateLimitError("a power too large for a template")
        elif operator == "+" and not ints:
            self.check_size(self.weight(left) + self.weight(right))
        elif operator == "%":
            self.check_format(left, right)
        return self._spend(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self._tick()
        if isinstance(getattr(obj, "__self__", None), str):
            self._check_str_method(obj.__self__, obj.__name__, args)
        return self._spend(super().call(context, obj, *args, **kwargs))

    def _check_str_method(self, s: str, name: str, args: tuple[Any, ...]) -> None:
        if name not in _STR_METHODS:
            raise TemplateLimitError(f"str.{name} is not available to chat templates")
        if name in ("center", "ljust", "rjust", "zfill") and args:
            self.check_size(max(len(s), int(args[0])))
        elif name == "expandtabs":
            self.check_size(len(s) * max(int(args[0]) if args else 8, 1))
        elif name == "replace" and len(args) >= 2:
            self.check_size(_replaced_size(s, args[0], args[1]))
        elif name == "join" and args and isinstance(args[0], (list, tuple)):
            self.check_size(self.weight(args[0]) + len(s) * len(args[0]))
        elif name == "join":
            raise TemplateLimitError("str.join in a chat template needs a list")

    def wrap_str_format(self, value: Any) -> Any:
        # As Jinja's, with each field's width checked (autoescape is off: Markup is a str here).
        if not isinstance(
            value, (types.MethodType, types.BuiltinMethodType)
        ) or value.__name__ not in ("format", "format_map"):
            return None
        s = value.__self__
        if not isinstance(s, str):
            return None

        @functools.wraps(value)
        def wrapper(*args: Any, **kwargs: Any) -> str:
            if value.__name__ == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one mapping argument")
                args, kwargs = (), args[0]
            return _BoundedFormatter(self).vformat(str(s), args, kwargs)

        return wrapper

    def _bounded_filter(self, name: str, func: Any) -> Any:
        @functools.wraps(func)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self._tick()
            values = [
                a
                for a in args
                if not isinstance(a, (jinja2.Environment, nodes.EvalContext, Context))
            ]
            if name == "join" and values and not isinstance(values[0], (list, tuple)):
                values[0] = list(values[0])
                args = (*args[: len(args) - len(values)], *values)
            self._check_filter(name, values, kwargs)
            return self._spend(func(*args, **kwargs))

        return bounded

    def _check_filter(self, name: str, values: list[Any], kwargs: dict[str, Any]) -> None:
        # The filters whose output can outgrow their input, checked before they build it.
        if not values:
            return
        s, rest = values[0], values[1:]

        def arg(i: int, key: str, default: Any) -> Any:
            return rest[i] if len(rest) > i else kwargs.get(key, default)

        if name == "center":
            self.check_size(max(len(str(s)), int(arg(0, "width", 80))))
        elif name == "indent":
            width = arg(0, "width", 4)
            pad = len(width) if isinstance(width, str) else int(width)
            self.check_size(len(str(s)) + pad * (str(s).count("\n") + 1))
        elif name == "wordwrap":
            width, wrap = int(arg(0, "width", 79)), arg(2, "wrapstring", None) or "\n"
            self.check_size(len(str(s)) + len(str(wrap)) * (len(str(s)) // max(width, 1) + 1))
        elif name == "replace" and len(rest) >= 2:
            self.check_size(_replaced_size(str(s), str(rest[0]), str(rest[1])))
        elif name == "join":
            self.check_size(self.weight(s) + len(str(arg(0, "d", ""))) * len(s))
        elif name == "format":
            self.check_format(s, tuple(rest) or tuple(kwargs.values()))
        elif name == "sum":
            self.check_size(self.weight(s) + self.weight(arg(1, "start", 0)))
        elif name in ("batch", "slice"):  # both pad to a count they are given
            self.check_size(int(arg(0, "linecount" if name == "batch" else "slices", 0)))


def _replaced_size(s: str, old: Any, new: Any) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(s)
    return len(s) + s.count(old) * max(len(new) - len(old), 0)


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


class ChatTemplateLimitError(ChatTemplateError):
    """A chat template went past its render budget: it loops too long or builds too much."""


# Rendered once when a template is loaded, so a template that explodes on ordinary input is
# refused then: every role, a tool definition, a tool call and its result.
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
_PROBE_CALL = {
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
_PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
    {"role": "tool", "name": "get_weather", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
    {"role": "user", "content": "Thanks!"},
]


class ChatTemplate:
    """A model's chat template bound to its tokenizer.

    Raises :class:`ChatTemplateError` when the template does not parse, and
    :class:`ChatTemplateLimitError` when rendering a representative conversation goes past the
    render budget (a template that would hang or exhaust memory on every request).
    """

    def __init__(self, source: str | None, tokenizer: Tokenizer) -> None:
        self.source = source or CHATML_TEMPLATE
        self.tokenizer = tokenizer
        self._env = BoundedEnvironment()
        try:
            self._template = self._env.compile_template(self.source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._specials = specials
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        for tools in (_PROBE_TOOLS, None):
            try:
                self._render_marked(_PROBE_MESSAGES, tools, True, {})
            except ChatTemplateLimitError as e:
                raise ChatTemplateLimitError(
                    f"the chat template fails a test render: {e.message}",
                    hint="the template loops without end or builds huge text; use a trusted "
                    "template instead of the one in the model file",
                ) from None
            except ChatTemplateError:
                pass  # templates may refuse some conversations (raise_exception); that is theirs

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
        size = _weight([context["messages"], context["tools"], kwargs], 1 << 62)
        try:
            text = self._env.render_bounded(self._template, context, size)
        except TemplateLimitError as e:
            raise ChatTemplateLimitError(f"chat template stopped: {e}") from None
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
