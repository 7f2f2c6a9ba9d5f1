"""The engine stands alone: nothing under backend/ imports the FUSE layer or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

BACKEND = Path(__file__).parent.parent / "backend"


def test_backend_never_imports_fsmount() -> None:
    offenders = []
    for path in BACKEND.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(BACKEND.parent)}: {n}" for n in names
                          if n == "fsmount" or n.startswith("fsmount.") or n in ("pyfuse3", "click", "rich")]
    assert offenders == []
