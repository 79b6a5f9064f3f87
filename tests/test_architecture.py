"""The package's floors (docs/architecture.md): imports point down, never in a circle, and no
module reaches into another's private names.

Every import statement counts, at module level or inside a function: a lazy import is still a
dependency. The method table's `module:function` builder strings are not imports: they are
resolved when a run starts, which is what lets the table sit on the lowest floor.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignkit"

# Bottom to top. A unit may import itself and the units listed before it, nothing after it.
FLOORS = (
    "errors",
    "knobs",
    "methods",
    "config",
    "rewards",
    "losses",
    "ops",
    "data",
    "models",
    "rollout",
    "monitor",
    "train",
    "eval",
    "serve",
    "quickstart",
    "cli",
    "__main__",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(target module, imported name or "", line) of every alignkit import in a module."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            if not base.startswith("alignkit"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "", node.lineno) if sub in known else (base, a.name, node.lineno))
    return out


def unit(module: str) -> str:
    """The floor unit of a module: its subpackage or top-level module under alignkit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for target, _, _ in imported(name, path, known):
            if target in known and target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_floor():
    units = {unit(m) for m in modules()} - {"__init__"}
    assert units <= set(FLOORS), f"give these a floor in FLOORS: {sorted(units - set(FLOORS))}"


def test_no_import_circles():
    assert cycles(graph()) == []


def test_imports_point_down():
    floor = {u: i for i, u in enumerate(FLOORS)}
    upward = []
    for source, targets in graph().items():
        for target in targets:
            a, b = unit(source), unit(target)
            if a != b and "__init__" not in (a, b) and floor[b] > floor[a]:
                upward.append(f"{source} -> {target} ({a} is below {b})")
    assert upward == []


def test_no_private_names_across_modules():
    known = modules()
    leaks = [
        f"{name}:{line} imports {attr} from {target}"
        for name, path in known.items()
        for target, attr, line in imported(name, path, known)
        if attr.startswith("_") and target != name
    ]
    assert leaks == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_circle_finder_finds_circles(edges, expected):
    """The check itself can fail: a two- and a three-module circle are found."""
    assert cycles(edges) == expected
