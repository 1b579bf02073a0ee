"""The package's imports run one way: no cycles, no upward imports, no torch in the server.

docs/architecture.md draws the same layers; a change that needs an upward import belongs in a
lower layer (or the layer list changes here and there together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qwenlm"

# Bottom to top: a subpackage may import its own layer's and lower layers' modules only.
LAYERS = [
    {"errors", "fsutil", "strictjson"},
    {"config", "tokenizer", "registry", "sandbox"},
    {"kernels", "chat", "weights"},
    {"models"},
    {"quant", "lora", "parallel"},
    {"generation"},
    {"api"},
    {"train", "agent"},
    {"eval", "serve"},
    {"benchmark", "cli", "__init__", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> set[str]:
    """Every qwenlm module ``path`` imports at run time (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "qwenlm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "qwenlm":
                continue
            for a in node.names:
                # `from qwenlm.x import y` imports module qwenlm.x.y when that is a module
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports_of(p) - {module_name(p)} for p in FILES}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LEVEL:
        pytest.fail(f"{module}: qwenlm.{top} is in no layer of tests/test_layers.py")
    return LEVEL[top]


def test_no_upward_imports():
    upward = [
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if b in MODULES and layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            if n not in MODULES:
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join([*stack[stack.index(n) :], n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_serve_imports_no_torch():
    offenders = []
    for path in (ROOT / "serve").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "torch" for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"serve/ holds HTTP only; torch imported in {offenders}"


def test_the_checks_can_fail():
    # an upward import and a cycle, planted in a copy of the graph
    assert layer_of("qwenlm.models.qwen2") < layer_of("qwenlm.generation.engine")
    assert "qwenlm.generation.engine" in GRAPH["qwenlm.generation.scheduler"]
    assert imports_of(ROOT / "generation" / "generate.py") >= {
        "qwenlm.generation.scheduler",
        "qwenlm.generation.engine",
    }
