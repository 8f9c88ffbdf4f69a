"""Dependency direction (design §1): graphs is pure; clients and service do not import each other.

`make lint` also runs import-linter with the contracts in pyproject.toml; this test repeats the
check with the standard library so that it holds for every module file, imported or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "graphs": {"torch", "fastapi", "httpx", "starlette", "uvicorn", "service", "clients"},
    "clients": {"service"},
    "service": {"clients"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_design(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {
        str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package])
        for f in files
        if _imports(f) & FORBIDDEN[package]
    }
    assert not bad, f"forbidden imports: {bad}"


def test_the_scanner_sees_function_level_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import torch.nn\n    from service.ingest import x\n")
    assert {"torch", "service"} <= _imports(f)
