"""The package's layout holds: no import cycle inside stoker, and arrows point one way."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / "stoker").rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every stoker module ``path`` imports, at module level or inside functions (a deferred
    import is still an arrow), except under ``if TYPE_CHECKING:`` (never run)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            submodules = {f"{base}.{a.name}" for a in node.names} & known
            if len(submodules) < len(node.names):  # names defined in base itself
                found.add(base)
            found.update(submodules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != name}


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or ``None``.

    An import of a package's own submodule from the package's ``__init__`` is the normal way a
    package is put together and is not followed back up (a submodule does not import its parent
    by being imported)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)) is not None:
            return found
    return None


def test_no_import_cycle_inside_stoker():
    graph = _graph()
    # The public API module imports everything; nothing below the CLI may import it back.
    back = [m for m, deps in graph.items() if "stoker" in deps and not m.startswith("stoker.cli")]
    assert not back, f"{back} import the public API module stoker/__init__"
    below = {m: d - {"stoker"} for m, d in graph.items() if m != "stoker"}
    assert _cycle(below) is None, f"import cycle: {' -> '.join(_cycle(below) or [])}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("stoker.system", "stoker.plan"),
        ("stoker.system", "stoker.tune"),
        ("stoker.system", "stoker.loader"),
        ("stoker.plan", "stoker.planning"),
        ("stoker.plan", "stoker.tune"),
        ("stoker.tune", "stoker.loader"),
        ("stoker.data", "stoker.loader"),
        ("stoker.data", "stoker.tune"),
    ],
)
def test_arrows_point_down(lower, upper):
    """Reading the machine sits below planning, planning below tuning, tuning below the loader;
    nothing imports the CLI."""
    graph = _graph()
    wrong = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m == lower or m.startswith(lower + ".")
        for d in deps
        if d == upper or d.startswith(upper + ".")
    )
    assert not wrong
    # The command line (stoker.cli and its stoker.cli_* helpers) is on top: nothing imports it.
    assert not [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if not m.startswith("stoker.cli")
        for d in deps
        if d.startswith("stoker.cli")
    ]


def test_import_stoker_imports_each_module_once():
    """In a fresh interpreter, ``import stoker`` runs each module's body exactly once (a cycle
    can make a module be re-entered half-initialised)."""
    code = (
        "import builtins, collections, sys\n"
        "seen = collections.Counter()\n"
        "real = builtins.__import__\n"
        "def counting(name, *a, **k):\n"
        "    fresh = name not in sys.modules\n"
        "    module = real(name, *a, **k)\n"
        "    if fresh and name.startswith('stoker'):\n"
        "        seen[name] += 1\n"
        "    return module\n"
        "builtins.__import__ = counting\n"
        "import stoker\n"
        "print(max(seen.values()), len(seen))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[0]) == 1 and int(out[1]) > 10
