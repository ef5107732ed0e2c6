"""node/sequence.py stays pure: only the standard library and node.records, no I/O modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "node" / "classify" / "sequence.py"
FORBIDDEN = ("torch", "monai", "pydicom", "pynetdicom", "socket", "sqlite3", "structlog")
IO_STDLIB = {"os", "io", "pathlib", "shutil", "socket", "subprocess", "tempfile", "sqlite3", "open"}


def _imports() -> set[str]:
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_sequence_imports_only_stdlib_and_records() -> None:
    imports = _imports()
    assert "node.records" in imports
    for name in imports:
        top = name.split(".")[0]
        if name == "node.records":
            continue
        assert top in sys.stdlib_module_names and top != "node", f"{name} is not allowed"
        assert top not in IO_STDLIB, f"{name} does I/O"


def test_sequence_calls_no_open_or_print() -> None:
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not calls & {"open", "print", "input", "exec", "eval", "__import__"}


def test_importing_sequence_loads_no_heavy_or_network_module() -> None:
    code = (
        "import sys, node.classify.sequence; "
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
