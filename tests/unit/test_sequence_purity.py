"""The sequence logic stays pure: tag rules, fusion, study context and the contrast evidence
import only the standard library, node.records, each other (and numpy, scipy.ndimage and
node.percentiles for the image evidence)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CLASSIFY = Path(__file__).resolve().parents[2] / "node" / "classify"
PURE = ("tags.py", "fusion.py", "sequence.py", "contrast.py")
PURE_NODE = {"node.records", "node.classify.tags", "node.classify.fusion"}
# node.percentiles: order statistics in numpy alone (checked pure in test_pure_imports.py)
EXTRA = {"contrast.py": {"numpy", "numpy.typing", "scipy", "node.percentiles"}}
FORBIDDEN = ("torch", "monai", "pydicom", "pynetdicom", "socket", "sqlite3", "structlog")
IO_STDLIB = {"os", "io", "pathlib", "shutil", "socket", "subprocess", "tempfile", "sqlite3", "open"}


def _imports(name: str) -> set[str]:
    tree = ast.parse((CLASSIFY / name).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_only_stdlib_and_records(name: str) -> None:
    imports = _imports(name)
    assert "node.records" in imports
    for module in imports:
        top = module.split(".")[0]
        if module in PURE_NODE or module in EXTRA.get(name, set()):
            continue
        assert top in sys.stdlib_module_names and top != "node", f"{name}: {module} not allowed"
        assert top not in IO_STDLIB, f"{name}: {module} does I/O"


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_call_no_open_or_print(name: str) -> None:
    tree = ast.parse((CLASSIFY / name).read_text(encoding="utf-8"))
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not calls & {"open", "print", "input", "exec", "eval", "__import__"}


def test_importing_the_sequence_logic_loads_no_heavy_or_network_module() -> None:
    code = (
        "import sys, node.classify.sequence, node.classify.contrast; "
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
