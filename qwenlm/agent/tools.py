"""Tools an agent can call: Python functions with JSON-schema parameters, kept in a registry.

A tool's result is always text handed back to the model as data. Whatever a tool raises is
caught and returned as an error observation, so a failing tool never stops the agent.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qwenlm.chat.tools import function_schema
from qwenlm.errors import QwenlmError


class ToolError(QwenlmError):
    """A tool was called with bad arguments, or failed; its message goes back to the model."""


@dataclass
class ToolResult:
    """What a tool call produced: text for the model, plus files (e.g. PNGs) for the caller."""

    text: str
    error: bool = False
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Tool:
    """A callable tool. ``fn`` takes the arguments as keywords and returns text (or a
    :class:`ToolResult`); ``parameters`` is a JSON-schema object describing them."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    name_for_human: str | None = None

    def schema(self) -> dict[str, Any]:
        return function_schema(self.name, self.description, self.parameters)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def check_arguments(schema: Mapping[str, Any], args: Mapping[str, Any]) -> None:
    """Check ``args`` against an object schema's ``required``, ``properties`` types and ``enum``
    (the subset tool definitions use); raises :class:`ToolError` naming the problem."""
    if not isinstance(args, Mapping):
        raise ToolError(f"arguments must be a JSON object, got {type(args).__name__}")
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        raise ToolError(f"missing required argument(s): {', '.join(missing)}")
    if schema.get("additionalProperties") is False:
        extra = [k for k in args if k not in props]
        if extra:
            raise ToolError(f"unknown argument(s): {', '.join(extra)}")
    for key, value in args.items():
        spec = props.get(key)
        if not isinstance(spec, Mapping):
            continue
        kind = spec.get("type")
        kinds = [kind] if isinstance(kind, str) else list(kind or [])
        if kinds:
            ok = any(
                isinstance(value, _JSON_TYPES.get(k, object))
                and not (k in ("integer", "number") and isinstance(value, bool))
                for k in kinds
            )
            if not ok:
                raise ToolError(
                    f"argument {key!r} must be {' or '.join(kinds)}, got {type(value).__name__}"
                )
        if "enum" in spec and value not in spec["enum"]:
            raise ToolError(f"argument {key!r} must be one of {spec['enum']}, got {value!r}")


class ToolRegistry:
    """Tools by name. ``call`` validates, runs, and turns any failure into an error result."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        if not tool.name or not tool.name.replace("_", "").replace("-", "").isalnum():
            raise ToolError(f"tool name {tool.name!r} must be letters, digits, '_' or '-'")
        if tool.parameters.get("type", "object") != "object":
            raise ToolError(f"tool {tool.name!r}: parameters must be a JSON-schema object")
        self._tools[tool.name] = tool
        return tool

    def register(
        self, *, name: str | None = None, description: str, parameters: Mapping[str, Any]
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@tools.register(description=..., parameters={...})`` on a function."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Tool(name or fn.__name__, description, dict(parameters), fn))
            return fn

        return wrap

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._tools.values()]

    def call(self, name: str, arguments: Any) -> ToolResult:
        """Run tool ``name``; an unknown tool, bad arguments or an exception is an error result."""
        tool = self._tools.get(name)
        if tool is None:
            return ToolResult(
                f"error: there is no tool named {name!r}; tools are: {', '.join(self._tools)}",
                error=True,
            )
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return ToolResult(f"error: the arguments are not valid JSON ({e.msg})", error=True)
        try:
            check_arguments(tool.parameters, arguments)
            out = tool.fn(**arguments)
        except ToolError as e:
            return ToolResult(f"error: {e.message}", error=True)
        except Exception as e:  # a tool's failure is an observation for the model
            return ToolResult(f"error: {type(e).__name__}: {e}", error=True)
        if isinstance(out, ToolResult):
            return out
        return ToolResult(
            out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)
        )


# -- a calculator: arithmetic only, evaluated on the syntax tree (no eval) ---------------------
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
    "factorial": math.factorial,
    "min": min,
    "max": max,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses, a few math
    functions). Exponents and factorials are bounded so one call cannot hang the agent."""
    if len(expression) > 1000:
        raise ToolError("expression is too long (over 1000 characters)")
    try:
        tree = ast.parse(
            expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval"
        )
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ToolError("exponent too large (over 1000)")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and not node.keywords
        ):
            args = [ev(a) for a in node.args]
            if node.func.id == "factorial" and (not args or args[0] > 1000):
                raise ToolError("factorial argument too large (over 1000)")
            return _FUNCTIONS[node.func.id](*args)
        raise ToolError(f"unsupported in a calculator expression: {ast.dump(node)[:60]}")

    try:
        value = ev(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, ValueError, TypeError) as e:
        raise ToolError(f"cannot compute: {e}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def calculator_tool() -> Tool:
    return Tool(
        "calculator",
        "Evaluate an arithmetic expression and return the number, e.g. '(3 + 4) * 12 / 7'. "
        "Supports + - * / // % ** and sqrt, log, exp, sin, cos, floor, ceil, factorial.",
        {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "the expression to evaluate"}
            },
            "required": ["expression"],
        },
        calculate,
        name_for_human="Calculator",
    )
