"""The package layout holds: the runtime never imports the lab, no import cycles, short modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "node"
LAB = ("node.lab", "matplotlib", "nilearn")
MAX_LINES = 550  # "about 500": a longer module says why in its docstring
LONG_REASON = "Why this module is long:"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_modules() -> list[str]:
    return [m for m in _modules() if not m.startswith("node.lab") and not m.endswith("__main__")]


def test_runtime_modules_never_import_the_lab() -> None:
    modules = _runtime_modules()
    assert "node.cli" in modules and "node.pipeline.runner" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(','.join(sorted(m for m in sys.modules if m.startswith({LAB!r}))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "", f"the runtime imports lab modules: {out.stdout}"


def _top_level_imports(path: Path, package: str) -> set[str]:
    """node.* modules imported at module level (TYPE_CHECKING blocks and functions left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            found.update(a.name for a in stmt.names if a.name.startswith("node"))
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            base = stmt.module
            if stmt.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - stmt.level + 1])
                base = f"{base}.{stmt.module}" if stmt.module else base
            if base.startswith("node"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in stmt.names)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycles() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _top_level_imports(path, package) if m in modules and m != name}
    # A module importing `node.x.y` also runs `node.x`'s __init__: count that edge too.
    for name, deps in graph.items():
        parents = {d.rpartition(".")[0] for d in deps}
        deps.update(p for p in parents if p in modules and not name.startswith(p))
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_long_modules_say_why() -> None:
    too_long = []
    for name, path in _modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and LONG_REASON not in doc:
            too_long.append(f"{name} ({n} lines)")
    assert too_long == [], f"modules over {MAX_LINES} lines without '{LONG_REASON}'"
