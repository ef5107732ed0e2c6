"""Pure modules (config, routing, ensemble, percentiles) pull in no torch, DICOM networking
or sockets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = ("node.config", "node.routing", "node.ensemble", "node.percentiles")
HEAVY = ("torch", "monai", "pynetdicom", "pydicom", "node.dicom.headers", "node.classify.sequence")
# Forbidden in the module's own import statements (stdlib pulls in socket for pydantic's
# metadata lookups, so the transitive check is for the heavy packages only).
NETWORK = ("socket", "http", "urllib", "requests", "httpx", "ssl", "sqlite3", "subprocess")


def test_pure_modules_import_no_heavy_packages() -> None:
    code = (
        "import sys\n"
        f"import {', '.join(PURE)}\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_network_at_top_level(module: str) -> None:
    path = REPO / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    for node in tree.body:  # module level only: cmd_* may import I/O lazily inside the function
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & {*NETWORK, "torch", "monai", "pynetdicom", "pydicom"}


@pytest.mark.parametrize("module", ("node.routing", "node.ensemble"))
def test_routing_and_ensemble_touch_no_files_outside_cmd(module: str) -> None:
    path = REPO / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("cmd_"):
            calls = {
                c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
                for c in ast.walk(fn)
                if isinstance(c, ast.Call)
            }
            assert not calls & {"open", "read_text", "read_bytes", "write_text", "print"}, fn.name
