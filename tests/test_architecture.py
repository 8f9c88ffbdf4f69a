"""Dependency direction (design §1): graphs is pure; clients and service do not import each other;
and a size any newcomer can read: no module over 400 lines, no function over 120.

`make lint` also runs import-linter with the contracts in pyproject.toml; this test repeats the
check with the standard library so that it holds for every module file, imported or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "graphs": {
        "torch", "fastapi", "httpx", "starlette", "uvicorn", "service", "clients", "prunegraph",
    },
    "clients": {"service", "prunegraph"},
    "service": {"clients", "prunegraph"},
}  # fmt: skip
PACKAGES = ("graphs", "service", "clients", "prunegraph")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 120


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


def _module_files() -> list[Path]:
    files = [f for package in PACKAGES for f in sorted((ROOT / package).rglob("*.py"))]
    assert len({f.parts[len(ROOT.parts)] for f in files}) == len(PACKAGES)
    return files


def _long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` of every function or method (nested ones too) longer than
    ``limit`` lines, from its ``def`` to its last line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path}:{node.lineno} {node.name} ({n} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := (node.end_lineno or node.lineno) - node.lineno + 1) > limit
    ]


def test_no_module_is_longer_than_400_lines() -> None:
    long = {
        str(f.relative_to(ROOT)): n
        for f in _module_files()
        if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): " + ", ".join(
        f"{name} ({n})" for name, n in sorted(long.items())
    )


def test_no_function_is_longer_than_120_lines() -> None:
    long = [hit for f in _module_files() for hit in _long_functions(f.relative_to(ROOT))]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): " + "; ".join(long)


def test_the_size_scanner_sees_long_nested_functions(tmp_path: Path) -> None:
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    f = tmp_path / "m.py"
    f.write_text(
        f"class C:\n    def ok(self):\n{body}\n    async def long(self):\n{body}        return 1\n"
    )
    assert [hit.split(" ", 1)[1] for hit in _long_functions(f)] == [
        f"long ({MAX_FUNCTION_LINES + 1} lines)"
    ]
