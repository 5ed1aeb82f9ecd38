"""The packages import downward only: ``cli`` above ``services`` and ``trainer``, both above ``shared``.

Read from the source with ``ast`` (imports inside functions count too), so an upward import anywhere,
even a lazy one, fails here before it becomes a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> the top-level packages of this project it must never import
FORBIDDEN = {
    "shared": {"services", "trainer", "cli"},
    "services": {"trainer", "cli"},
    "trainer": {"services", "cli"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for name, line in sorted(imported_packages(path))
        if name in FORBIDDEN[package]
    ]
    assert bad == [], "imports that run upward:\n" + "\n".join(bad)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from services.gateway import app\n    import trainer.sft\n")
    assert imported_packages(source) == {("os", 1), ("services", 4), ("trainer", 5)}
